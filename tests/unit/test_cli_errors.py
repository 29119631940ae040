"""The CLI's exit codes and messages at its edges: a broken torch install, a closed stdout pipe,
output paths that cannot be written, out-of-range flags, bad ``--set`` items, non-UTF-8 values
and paths that are not checkpoint roots (docs/operations.md "Exit codes")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service.cli.common import human_bytes
from service.cli.failures import failure
from service.errors import EXIT_BROKEN_PIPE, EXIT_OK, EXIT_STORAGE, EXIT_USAGE
from tests.helpers import FTDIFF, REPO, committed_root, ftdiff_subprocess, raised_in
from tests.helpers import ftdiff_inprocess as ftdiff


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A local root with committed steps 1 and 2 (a small model, in this process)."""
    return committed_root(str(tmp_path_factory.mktemp("errors") / "run"), 2)


# -- a torch that does not import ----------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_env_and_version_report_a_broken_torch_instead_of_crashing(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("libcudart.so.13: cannot open shared object file")\n')
    env = {"PYTHONPATH": str(tmp_path / "fake")}
    res = ftdiff_subprocess("env", env=env)
    assert res.returncode == EXIT_OK, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    torch_line = next(line for line in res.stdout.splitlines() if line.startswith("torch "))
    assert "broken: ImportError: libcudart.so.13" in torch_line
    assert "torch is broken" in res.stdout  # the cuda line says why it knows nothing
    res = ftdiff_subprocess("--version", env=env)
    assert res.returncode == EXIT_OK and res.stdout.startswith("ftdiff ") and "Traceback" not in res.stderr


@pytest.mark.timeout(60)
def test_worker_parser_still_builds_from_the_entry_module():
    from service.train.entry import build_parser

    p = build_parser()
    assert p.prog == "python -m service.train" and "--set" in p.format_help()
    assert p.parse_args(["--set", "train.max_steps=3"]).set == ["train.max_steps=3"]


# -- closed stdout, storage vs local errors, output paths, flag ranges ---------------------------
@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_closed_stdout_pipe_ends_quietly_with_141(root):
    for args in (["ckpt", "ls", root], ["ckpt", "ls", root, "--json"]):
        proc = subprocess.Popen([FTDIFF, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the command writes a byte (`| head -0`)
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=100) == EXIT_BROKEN_PIPE, err
        assert err == "", err


@pytest.mark.timeout(20)
def test_only_the_storage_layers_errors_are_storage_errors():
    code, message = failure(raised_in("fsspec.implementations.local", PermissionError(13, "denied")))
    assert code == EXIT_STORAGE and message.startswith("storage access denied")
    code, _ = failure(raised_in("s3fs.core", ConnectionResetError("reset")))
    assert code == EXIT_STORAGE
    code, message = failure(raised_in("PIL.Image", PermissionError(13, "Permission denied")))
    assert code == EXIT_USAGE and "storage" not in message
    code, message = failure(raised_in("somewhere.else", BrokenPipeError(32, "Broken pipe")))
    assert code != EXIT_STORAGE and "storage" not in message


@pytest.mark.timeout(60)
def test_output_paths_that_cannot_be_written_are_usage_errors_naming_out(root, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    unwritable = "/sys/ftdiff-test.png"  # sysfs refuses new files, root or not
    cases = [("sample", root, "--out", unwritable),
             ("sample", root, "--out", str(afile / "g.png")),
             ("sample", root, "--out", str(afile / "sub" / "g.png")),
             ("export", root, "--format", "safetensors", "--out", "/sys/ftdiff-test.safetensors"),
             ("export", root, "--format", "diffusers", "--out", str(afile / "unet"))]
    for args in cases:
        res = ftdiff(*args)
        assert res.returncode == EXIT_USAGE, (args, res.stderr)
        assert "--out" in res.stderr and "storage" not in res.stderr, (args, res.stderr)
    assert not (afile.parent / "sub").exists()


@pytest.mark.timeout(60)
def test_sample_flags_are_checked_before_sampling(root, tmp_path):
    out = str(tmp_path / "g.png")
    for steps in ("0", "-3", "2000"):
        res = ftdiff("sample", root, "--out", out, "--steps", steps)
        assert res.returncode == EXIT_USAGE and "--steps" in res.stderr, (steps, res.stderr)
    res = ftdiff("sample", root, "--out", out, "--steps", "2000")
    assert "1000" in res.stderr and "num_train_timesteps" in res.stderr
    res = ftdiff("sample", root, "--out", out, "--n", "0")
    assert res.returncode == EXIT_USAGE and "--n" in res.stderr
    assert not Path(out).exists()


# -- --set items ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_bad_set_item_is_blamed_on_set(monkeypatch):
    monkeypatch.delenv("FTDIFF_OVERRIDES", raising=False)
    for extra in (["--print-config"], ["--dry-run"]):
        res = ftdiff("train", "--set", "supervisor=x", *extra)
        assert res.returncode == EXIT_USAGE
        assert "--set" in res.stderr and "FTDIFF_OVERRIDES" not in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_non_utf8_values_are_refused_not_written_as_invalid_toml(monkeypatch):
    raw = "checkpoint.url=/tmp/x/lat\udce9n/ck"  # b"\xe9" from a Latin-1 shell, as Python sees it
    monkeypatch.delenv("FTDIFF_OVERRIDES", raising=False)
    res = ftdiff("train", "--set", raw, "--print-config")
    assert res.returncode == EXIT_USAGE and "--set" in res.stderr and "UTF-8" in res.stderr
    assert res.stdout == ""
    monkeypatch.setenv("FTDIFF_OVERRIDES", f'["{raw}"]')
    res = ftdiff("train", "--print-config")
    assert res.returncode == EXIT_USAGE and "checkpoint.url" in res.stderr and "UTF-8" in res.stderr
    monkeypatch.setenv("FTDIFF_OVERRIDES", '["checkpoint.url=/tmp/x/lat\\u00e9n/ck"]')
    res = ftdiff("train", "--print-config")  # real Unicode is fine
    assert res.returncode == EXIT_OK and 'url = "/tmp/x/latén/ck"' in res.stdout


# -- cosmetics -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_ls_of_a_file_and_a_negative_keep_every_are_usage_errors(root, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    res = ftdiff("ckpt", "ls", str(afile))
    assert res.returncode == EXIT_USAGE and "not a checkpoint root" in res.stderr
    assert "(no checkpoints)" not in res.stdout
    res = ftdiff("ckpt", "prune", root, "--keep-last", "2", "--keep-every", "-3", "--dry-run")
    assert res.returncode == EXIT_USAGE and "--keep-every" in res.stderr


@pytest.mark.timeout(20)
def test_sizes_round_up_into_the_next_unit_and_sample_help_names_ddpm():
    from service.cli import build_parser

    assert human_bytes(1048575) == "1.0 MiB" and human_bytes(1024**3 - 1) == "1.0 GiB"
    assert human_bytes(1048514) == "1023.9 KiB"  # still below the next unit when printed
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "sample" in a.choices)
    text = sub.choices["sample"].format_help()
    assert "strided DDPM" in text and "DDIM" not in text
