"""Checkpoints cross Python versions: a job on Debian's own Python (3.11.2, which
pickles Enum members in DCP's .metadata as getattr(cls, name)) resumes, and what it writes
resumes, verifies and exports on the suite's Python, and the other way round.

Debian's interpreter gets a venv of its own whose site-packages chain to this one's: every
package in it is built for CPython 3.11, so the same wheels serve 3.11.2 and 3.11.7.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from tests.helpers import REPO, run, torchrun_cmd, why
from tests.helpers import ftdiff_inprocess as ftdiff

SYSTEM_PYTHON = Path("/usr/bin/python3.11")


@pytest.fixture(scope="module")
def debian_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is not installed (Debian's python3.11)")
    venv = tmp_path_factory.mktemp("debian-python") / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    # Every site folder of this interpreter: its venv's, and where that venv was made with
    # --system-site-packages (a torch of the system, as GPU images have), the base's too.
    parents = [sysconfig.get_paths()["purelib"]] + [
        p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(parents)]
    (site / "zz-ftdiff-parent.pth").write_text("\n".join(lines) + "\n")
    python = str(venv / "bin" / "python")
    version = subprocess.run([python, "-c", "import sys, torch, service; print(sys.version.split()[0])"],
                             capture_output=True, text=True, timeout=120, check=True, cwd=REPO).stdout.strip()
    assert version != sys.version.split()[0], "the point is a second Python: this one is the suite's"
    return python


def _job(python: str, url: str, steps: int) -> list[str]:
    cmd = torchrun_cmd([f"train.max_steps={steps}", "checkpoint.every_steps=2", f'checkpoint.url="{url}"'])
    return [python, *cmd[1:]]


@pytest.mark.timeout(300)
def test_debian_python_resumes_and_checkpoints_cross_over(debian_python, tmp_path):
    url = str(tmp_path / "ckpt")
    for python, steps in ((debian_python, 4), (debian_python, 6), (sys.executable, 8), (debian_python, 10)):
        res = run(_job(python, url, steps), timeout=240)
        assert res.returncode == 0, f"{python} to step {steps}: " + why(res)
        assert Catalog(open_storage(url)).latest()[0] == steps
    assert ftdiff("ckpt", "verify", url).returncode == 0
    out = tmp_path / "w.safetensors"
    assert ftdiff("export", url, "--format", "safetensors", "--out", str(out)).returncode == 0 and out.exists()
