"""Exit codes and one-line messages of the read commands, and the start-up storage check,
on local and in-memory storage (the S3 cases are in tests/integration/test_bad_storage.py)."""

from __future__ import annotations

import json
import os
import pickle
import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from service.checkpoint.catalog import Catalog
from service.checkpoint.dcp_io import crc32c_hex
from service.checkpoint.manifest import MANIFEST, step_dir
from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import PROBE_PREFIX, check_reachable
from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_STORAGE, EXIT_USAGE, StorageError, UserError
from tests.helpers import committed_root, one_line, raised_in
from tests.helpers import ftdiff_inprocess as ftdiff

SECRET = "pw-" + uuid.uuid4().hex


# -- the start-up check --------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_write_check_probes_and_cleans_up_read_check_creates_nothing(tmp_path):
    root = tmp_path / "new" / "run"
    check_reachable(open_storage(str(root)), write=False)
    assert not root.exists()  # a read-only command never creates the root
    check_reachable(open_storage(str(root)))  # write=True by default: workers, the launcher
    assert root.is_dir() and os.listdir(root) == []  # the probe was deleted


class _Denying(MemoryFileSystem):
    """A store whose credentials may list and read but not write (or not delete)."""

    deny = "pipe_file"

    def pipe_file(self, path, value, **kwargs):  # type: ignore[no-untyped-def]
        if self.deny == "pipe_file":
            raise PermissionError("Access Denied")
        return super().pipe_file(path, value, **kwargs)

    def rm(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.deny == "rm" and PROBE_PREFIX in str(path):
            raise PermissionError("Access Denied")
        return super().rm(path, *args, **kwargs)

    def rm_file(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.deny == "rm" and PROBE_PREFIX in str(path):
            raise PermissionError("Access Denied")
        return super().rm_file(path, *args, **kwargs)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("deny,needle", [("pipe_file", "write access denied"), ("rm", "delete access denied")])
def test_read_only_credentials_fail_at_start_up(deny, needle):
    storage = open_storage(f"memory://ro-{uuid.uuid4().hex[:8]}/run")
    storage.fs = _Denying(skip_instance_cache=True)
    storage.fs.deny = deny
    check_reachable(storage, write=False)  # reading is allowed
    with pytest.raises(StorageError) as e:
        check_reachable(storage)
    assert needle in str(e.value) and e.value.exit_code == EXIT_STORAGE


@pytest.mark.timeout(20)
def test_unreachable_and_denied_are_storage_errors_without_secrets():
    from botocore.exceptions import ClientError, EndpointConnectionError

    storage = open_storage(f"memory://x-{uuid.uuid4().hex[:8]}")
    for error, needle in [
        (EndpointConnectionError(endpoint_url=f"http://key:{SECRET}@127.0.0.1:1/"), "unreachable"),
        (ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "no"}}, "ListObjectsV2"),
         "access denied"),
        (ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no"}}, "ListObjectsV2"), "access denied"),
    ]:
        def ls(*args, error=error, **kwargs):  # type: ignore[no-untyped-def]
            raise error

        storage.fs = MemoryFileSystem(skip_instance_cache=True)
        storage.fs.ls = ls
        storage.fs.exists = lambda *a, **k: True
        for write in (False, True):
            with pytest.raises(StorageError, match=needle) as e:
                check_reachable(storage, write=write)
            assert SECRET not in str(e.value)


@pytest.mark.timeout(20)
def test_a_path_that_cannot_be_a_folder_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError) as e:
        check_reachable(open_storage(str(blocker / "sub")))
    assert not isinstance(e.value, StorageError) and "storage URL" in str(e.value)


# -- the commands --------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_ls_of_a_missing_root_is_an_error_an_empty_root_is_not(tmp_path):
    res = ftdiff("ckpt", "ls", str(tmp_path / "nothing"))
    assert res.returncode == EXIT_FAILURE and "no such checkpoint root" in one_line(res.stderr)
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "empty").mkdir()
    res = ftdiff("ckpt", "ls", str(tmp_path / "empty"))
    assert res.returncode == EXIT_OK and res.stdout.strip() == "(no checkpoints)"
    for cmd in (["ckpt", "show"], ["ckpt", "verify"], ["sample", "--out", str(tmp_path / "g.png")],
                ["export", "--format", "safetensors", "--out", str(tmp_path / "u.st")]):
        res = ftdiff(*cmd[:2], str(tmp_path / "nothing"), *cmd[2:]) if cmd[0] == "ckpt" else \
            ftdiff(cmd[0], str(tmp_path / "nothing"), *cmd[1:])
        assert res.returncode == EXIT_FAILURE, (cmd, res.stderr)
        one_line(res.stderr)


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> str:
    """A local root with committed steps 1 and 2 (a small model, in this process)."""
    return committed_root(str(tmp_path_factory.mktemp("ckpt") / "run"), 2, keep_last=None)


@pytest.mark.timeout(60)
def test_short_and_padded_step_names_work_everywhere(committed):
    shown = [ftdiff("ckpt", "show", f"{committed}/{name}") for name in ("step-2", "step-000000002", "step-2/")]
    assert all(r.returncode == EXIT_OK for r in shown), shown[0].stderr
    assert len({r.stdout for r in shown}) == 1 and json.loads(shown[0].stdout)["step"] == 2
    res = ftdiff("ckpt", "verify", f"{committed}/step-1")
    assert res.returncode == EXIT_OK and res.stdout.startswith("OK ") and res.stdout.rstrip().endswith("step-000000001")
    res = ftdiff("ckpt", "show", f"{committed}/step-7")
    assert res.returncode == EXIT_FAILURE and "step-000000007" in one_line(res.stderr)


def _copy_root(src: str, dst) -> str:  # type: ignore[no-untyped-def]
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.timeout(60)
def test_corrupt_manifest_entry_is_exit_1_naming_it(committed, tmp_path):
    url = _copy_root(committed, tmp_path / "run")
    path = tmp_path / "run" / step_dir(2) / MANIFEST
    body = json.loads(path.read_text())
    body["files"]["../../outside.distcp"] = {"size": 1, "crc32c": "00000000"}
    path.write_text(json.dumps(body))
    res = ftdiff("ckpt", "show", f"{url}/step-2")
    line = one_line(res.stderr)
    assert res.returncode == EXIT_FAILURE and "step-000000002" in line and "../../outside.distcp" in line
    listing = json.loads(ftdiff("ckpt", "ls", url, "--json").stdout)
    assert [(e["step"], e["committed"]) for e in listing] == [(1, True), (2, False)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["flipped", "unsafe"])
def test_unloadable_checkpoint_is_exit_1_one_line_traceback_only_with_verbose(committed, tmp_path, how):
    url = _copy_root(committed, tmp_path / "run")
    folder = tmp_path / "run" / step_dir(2)
    meta = folder / ".metadata"
    if how == "flipped":
        data = bytearray(meta.read_bytes())
        data[len(data) // 2] ^= 0x01
        meta.write_bytes(bytes(data))
    else:  # a pickle that would run code, with a manifest entry that matches it
        class Evil:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return (os.system, ("echo pwned",))

        payload = pickle.dumps(Evil())
        meta.write_bytes(payload)
        body = json.loads((folder / MANIFEST).read_text())
        body["files"][".metadata"] = {"size": len(payload), "crc32c": crc32c_hex(payload)}
        (folder / MANIFEST).write_text(json.dumps(body))
    out = str(tmp_path / "unet.safetensors")
    res = ftdiff("export", f"{url}/step-2", "--format", "safetensors", "--out", out)
    line = one_line(res.stderr)
    assert res.returncode == EXIT_FAILURE and ".metadata" in line
    assert ("corrupt" if how == "flipped" else "unsafe") in line
    assert not os.path.exists(out)
    for argv in (["--verbose", "export", f"{url}/step-2", "--format", "safetensors", "--out", out],
                 ["export", f"{url}/step-2", "--format", "safetensors", "--out", out, "--verbose"]):
        res = ftdiff(*argv)
        assert res.returncode == EXIT_FAILURE and "Traceback" in res.stderr


@pytest.mark.timeout(20)
def test_usage_errors_stay_exit_2(committed, tmp_path):
    res = ftdiff("sample", committed, "--out", str(tmp_path), "--n", "1")  # a directory
    assert res.returncode == EXIT_USAGE and "is a directory" in one_line(res.stderr)
    for name in ("grid", "grid.txt", "grid.jpg"):  # refused before any sampling time is spent
        res = ftdiff("sample", committed, "--out", str(tmp_path / name), "--n", "1")
        assert res.returncode == EXIT_USAGE and "ending in .png" in one_line(res.stderr), res.stderr
        assert not (tmp_path / name).exists()
    res = ftdiff("ckpt", "prune", committed, "--keep-last", "0")
    assert res.returncode == EXIT_USAGE
    assert Catalog(open_storage(committed)).committed_steps() == [1, 2]


@pytest.mark.timeout(20)
def test_failure_table():
    from botocore.exceptions import EndpointConnectionError
    from torch.distributed.checkpoint.api import CheckpointException

    from service.checkpoint.errors import CorruptCheckpointError, ManifestError, UnsafeCheckpointError
    from service.cli import _failure
    from service.errors import BadCheckpointError

    shard = "bucket/run/step-000000004/__1_i2_0.distcp"
    cases = [
        (UserError("bad --out"), EXIT_USAGE, "bad --out"),
        (StorageError("storage URL 's3://b/r' is unreachable"), EXIT_STORAGE, "unreachable"),
        (BadCheckpointError("no committed checkpoint under s3://b/r"), EXIT_FAILURE, "no committed"),
        (CorruptCheckpointError(shard, "crc32c 1 != 2"), EXIT_FAILURE, f"corrupt checkpoint file {shard}"),
        (UnsafeCheckpointError(shard, "refusing posix.system"), EXIT_FAILURE, f"unsafe checkpoint file {shard}"),
        (CheckpointException("load", {0: (CorruptCheckpointError(shard, "size 3 != 4"), None)}), EXIT_FAILURE,
         f"corrupt checkpoint file {shard}: size 3 != 4"),
        (CheckpointException("load", {1: (RuntimeError("Missing key x"), None)}), EXIT_FAILURE,
         "checkpoint load failed: RuntimeError: Missing key x"),
        (ManifestError("manifest entry '../x': not a file name"), EXIT_FAILURE, "../x"),
        # s3fs turns S3's AccessDenied into a PermissionError: the storage's, by its frame.
        # (Raised anywhere else, a PermissionError is a local path's: tests/unit/test_cli_errors.py.)
        (raised_in("s3fs.core", PermissionError("Access Denied")), EXIT_STORAGE, "access denied"),
        (EndpointConnectionError(endpoint_url=f"http://k:{SECRET}@127.0.0.1:1"), EXIT_STORAGE, "unreachable"),
        (ValueError("boom"), EXIT_FAILURE, "--verbose"),
    ]
    for error, code, needle in cases:
        got_code, message = _failure(error)
        assert (got_code, needle in message, SECRET in message) == (code, True, False), (error, message)


@pytest.mark.timeout(60)
def test_a_run_folder_given_for_its_root_is_refused_naming_the_checkpoints_folder(committed, tmp_path):
    run = tmp_path / "runs" / "exp"
    _copy_root(committed, run / "checkpoints")
    for cmd in (["ckpt", "ls"], ["ckpt", "show"], ["ckpt", "prune", "--keep-last", "2"]):
        res = ftdiff(*cmd[:2], str(run), *cmd[2:])
        assert res.returncode == EXIT_USAGE, (cmd, res.stdout, res.stderr)
        assert f"{run}/checkpoints" in one_line(res.stderr)
