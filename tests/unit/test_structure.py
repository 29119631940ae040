"""The package's shape (docs/architecture.md): imports run one way, no cycles, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
# Layers, lowest first: a module may import from its own layer and the ones below it.
LAYERS = [
    {"errors", "redact", "config", "logs", "metrics", "faults", "models", "data", "launch_env", "vocabulary",
     "state_keys"},
    {"node", "heartbeat", "dist"},  # per-node process plumbing, the heartbeat wire, the process group
    {"checkpoint"},
    {"supervisor", "train", "weights", "sample", "export"},
    {"cli"},
]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in SERVICE.rglob("*.py"):
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("service")}
    return found & known


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m != "service" and _layer(m) is None] == []


def test_imports_never_run_upwards_and_checkpoint_never_sees_the_worker():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for dep in _imports(path, set(modules)):
            if dep == "service":
                continue
            if _layer(dep) > _layer(name):  # type: ignore[operator]
                upward.append(f"{name} -> {dep}")
            if name.startswith(("service.checkpoint", "service.supervisor")) and dep.startswith("service.train"):
                upward.append(f"{name} -> {dep}")
            if name.startswith("service.checkpoint") and dep.startswith("service.supervisor"):
                upward.append(f"{name} -> {dep}")
            # Side by side on one layer, but independent: the worker and the supervisor talk
            # only through heartbeats; the tools read checkpoints without the worker.
            if name.startswith("service.train") and dep.startswith("service.supervisor"):
                upward.append(f"{name} -> {dep}")
            if name.startswith("service.supervisor") and dep.startswith("service.train"):
                upward.append(f"{name} -> {dep}")
            tools = ("service.weights", "service.export", "service.sample")
            if name.startswith(tools) and dep.startswith(("service.train", "service.supervisor")):
                upward.append(f"{name} -> {dep}")
    assert upward == []


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {"service"} for name, path in modules.items()}

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        frontier = [start]
        while frontier:
            for dep in graph.get(frontier.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    frontier.append(dep)
        return seen

    assert [name for name in graph if name in reachable(name)] == []


@pytest.mark.parametrize("path", sorted(SERVICE.rglob("*.py")), ids=lambda p: str(p.relative_to(SERVICE)))
def test_modules_stay_small(path: Path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
