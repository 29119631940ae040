"""A local checkpoint folder this user may not write (an image's non-root user under a
root-owned working directory): the error names the folder and the uid, not credentials."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO, base_env

# Imports first (the interpreter's files may be unreadable to the other user), then drop to an
# unprivileged uid, as `docker run ftdiff:cpu` runs as 10001.
PROBE = """
import os, sys, tempfile
from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import check_reachable
from service.errors import EXIT_STORAGE, StorageError
open_storage(tempfile.gettempdir())  # fsspec imports its implementations lazily: load them now
os.setgid(10001); os.setuid(10001)
try:
    check_reachable(open_storage(sys.argv[1]))
except StorageError as e:
    print(e); sys.exit(EXIT_STORAGE)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sub", ["runs/ftdiff/checkpoints", ""])
def test_unwritable_local_folder_names_the_uid_and_the_fix(sub):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    # Not under pytest's tmp_path: its parents are private to root, and the other user must be
    # able to reach the folder to find it unwritable.
    root = Path(tempfile.mkdtemp(prefix="ftdiff-rootowned-"))
    try:
        os.chmod(root, 0o755)
        url = str(root / sub) if sub else str(root)
        res = subprocess.run([sys.executable, "-c", PROBE, url], env=base_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=50)
        leftovers = list(root.iterdir())
    finally:
        shutil.rmtree(root)
    from service.errors import EXIT_STORAGE

    assert res.returncode == EXIT_STORAGE, res.stdout + res.stderr
    message = res.stdout.strip()
    assert "uid 10001" in message and "writable" in message and url in message
    assert "credential" not in message.lower()
    assert leftovers == []
    assert ("cannot create or list" if sub else "cannot write in") in message
