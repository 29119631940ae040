"""The constraints lock (constraints.txt): read it, check it against pyproject.toml and the
installed environment, and write it from the environment (`make lock`).

The lock pins every package the project and its test and digits extras pull in, at the
versions the suite was last green with; torch is left out on purpose (the Makefile installs
the CPU build where none is present and keeps a GPU build that is already there).
"""

from __future__ import annotations

import sys
import tomllib
from datetime import date
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "constraints.txt"
EXTRAS = ("test", "digits")
# Never pinned: the project itself, the installer's own tools, and torch with what only a CUDA
# build of it brings (the Makefile chooses torch per machine).
UNPINNED = frozenset(canonicalize_name(n) for n in ("ftdiff", "pip", "setuptools", "wheel", "torch", "triton"))
HEADER = """\
# Constraints for `make test`, `make run` and CI: every package at the version the suite was last
# green with (torch excepted: the Makefile picks it). Refresh with `make lock`, then `make test`;
# `make test-latest` runs the suite on the newest releases instead. Written {day} on Python {py}.
"""


def is_unpinned(name: str) -> bool:
    canonical = canonicalize_name(name)
    return canonical in UNPINNED or canonical.startswith("nvidia-")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{path.name}: {raw!r} is not a name==version pin")
        canonical = canonicalize_name(name.strip())
        if canonical in pins:
            raise ValueError(f"{path.name}: {name.strip()} is pinned twice")
        pins[canonical] = version.strip()
    return pins


def project_requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """pyproject.toml's runtime dependencies and the named extras, for this interpreter."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, texts) if r.marker is None or r.marker.evaluate()]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution the requirements reach,
    extras and markers followed, torch's own subtree left out."""
    found: dict[str, str] = {}
    pending = [(r, tuple(r.extras)) for r in roots]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while pending and len(seen) < 10_000:
        req, extras = pending.pop()
        name = canonicalize_name(req.name)
        if is_unpinned(name) or (name, extras) in seen:
            continue
        seen.add((name, extras))
        found[name] = metadata.version(req.name)
        for text in metadata.requires(req.name) or []:
            dep = Requirement(text)
            for extra in ("", *extras):
                if dep.marker is None or dep.marker.evaluate({**default_environment(), "extra": extra}):
                    pending.append((dep, tuple(sorted(dep.extras))))
                    break
    return found


def write(path: Path) -> None:
    """Pin what is installed in this interpreter's environment (the fresh venv of `make lock`)."""
    pins = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if not is_unpinned(name)]
    header = HEADER.format(day=date.today().isoformat(), py=sys.version.split()[0])
    path.write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "write":
        sys.exit("usage: python -m tests.lockfile write constraints.txt")
    write(Path(sys.argv[2]))
