"""``ftdiff train --print-config`` and ``--dry-run``: the first-run checks (the CLI in this
process; nothing here starts a worker)."""

from __future__ import annotations

import json
import os
import tomllib
import uuid
from pathlib import Path

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import PROBE_PREFIX
from service.cli.toml_out import dumps
from service.config import load_config
from service.config.loading import resolve_file_relative
from service.errors import EXIT_OK, EXIT_STORAGE, EXIT_USAGE, UserError
from service.launch_env import OVERRIDES_ENV
from tests.helpers import committed_root, free_port, one_line
from tests.helpers import ftdiff_inprocess as ftdiff

TOKEN = "tok-" + uuid.uuid4().hex
SECRET = "sk-" + uuid.uuid4().hex


def _url(path: object) -> str:
    return f'checkpoint.url="{path}"'


# -- --print-config ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_print_config_redacts_secrets_and_touches_nothing(tmp_path):
    root = tmp_path / "never-created"
    res = ftdiff("train", "--print-config", "--set", f"supervisor.token={TOKEN}",
                 "--set", f'data.url="s3://AKIA:{SECRET}@bucket/images"', "--set", _url(root))
    assert res.returncode == EXIT_OK, res.stderr
    assert TOKEN not in res.stdout + res.stderr and SECRET not in res.stdout + res.stderr
    body = tomllib.loads(res.stdout)
    assert body["supervisor"]["token"] == "***"
    assert body["data"]["url"] == "s3://***@bucket/images"
    assert body["checkpoint"]["url"] == str(root) and not root.exists()


@pytest.mark.timeout(60)
def test_print_config_round_trips_and_includes_file_set_and_environment(tmp_path, monkeypatch):
    cfg_file = tmp_path / "job.toml"
    cfg_file.write_text('[train]\nmax_steps = 77\nlr = 1e-05\n[run]\nname = "quote\\" and \\\\ slash"\n')
    monkeypatch.setenv(OVERRIDES_ENV, json.dumps(["model.sample_size=32", "train.max_steps=88"]))
    res = ftdiff("train", "--config", str(cfg_file), "--print-config")
    assert res.returncode == EXIT_OK, res.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(res.stdout)
    expected = load_config(cfg_file, ["model.sample_size=32", "train.max_steps=88"])
    expected_body = expected.to_dict()
    resolve_file_relative(expected_body, Path.cwd())  # printed paths are absolute: a saved copy means the same
    assert Path(expected_body["checkpoint"]["url"]).is_absolute()
    assert load_config(printed).to_dict() == expected_body  # every key, every type
    assert expected.train.max_steps == 88 and expected.run.name == 'quote" and \\ slash'
    # --set comes after FTDIFF_OVERRIDES: it wins where both name a key, the rest stays.
    res = ftdiff("train", "--config", str(cfg_file), "--print-config", "--set", "train.max_steps=5")
    assert tomllib.loads(res.stdout)["train"]["max_steps"] == 5
    assert tomllib.loads(res.stdout)["model"]["sample_size"] == 32


@pytest.mark.timeout(60)
def test_print_config_of_a_bad_config_is_exit_2(tmp_path):
    res = ftdiff("train", "--print-config", "--set", "train.max_stepz=3")
    assert res.returncode == EXIT_USAGE and "max_stepz" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.timeout(20)
def test_toml_writer_round_trips_awkward_values():
    body = {"s": {"quote": 'a"b', "slash": "c:\\d", "nl": "x\ny\tz", "del": "a\x7fb", "uni": "é≈😀",
                  "ctl": "\x01\x1f", "tiny": 1e-05, "whole": 3.0, "big": 1e300, "neg": -2, "yes": True,
                  "inf": float("inf"), "list": [1, "a"], "unset": None, "dotted.key": 1, "": "empty"}}
    back = tomllib.loads(dumps(body, header="line one\n\nline three"))
    expected = {k: v for k, v in body["s"].items() if v is not None}
    assert back == {"s": expected}


# -- --dry-run ----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dry_run_of_a_good_config_is_0_and_writes_nothing(tmp_path):
    root = tmp_path / "new" / "run"
    res = ftdiff("train", "--dry-run", "--set", _url(root), "--set", "supervisor.port=0", "--set", "metrics.port=0")
    assert res.returncode == EXIT_OK, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines[:6]] == ["config", "geometry", "data", "storage", "ports", "resume"]
    assert "fresh start" in res.stdout and "reachable and writable" in res.stdout
    assert lines[-1].startswith("dry run ok")
    assert not (tmp_path / "new").exists()  # the probe's folder is gone again, and nothing else was made


@pytest.mark.timeout(120)
def test_dry_run_says_what_is_suspicious_and_still_passes(tmp_path):
    res = ftdiff("train", "--dry-run", "--set", _url(tmp_path / "run"), "--set", "supervisor.port=0",
                 "--set", "metrics.port=0", "--set", "train.max_steps=20")
    assert res.returncode == EXIT_OK, res.stderr
    assert "warning: train.max_steps = 20 <= train.warmup_steps = 50" in res.stdout, res.stdout


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> str:
    """A local root with committed steps 1..3, written with the default config."""
    return committed_root(str(tmp_path_factory.mktemp("dry") / "run"), 3, samples_per_step=16)


def _listing(root: str) -> list[tuple[str, list[str]]]:
    return sorted((d, sorted(f)) for d, _, f in os.walk(root))


@pytest.mark.timeout(120)
def test_dry_run_reports_the_resume_point_and_refuses_changed_math(committed):
    before = _listing(committed)
    ports = ["--set", "supervisor.port=0", "--set", "metrics.port=0"]
    res = ftdiff("train", "--dry-run", "--set", _url(committed), *ports)
    assert res.returncode == EXIT_OK, res.stderr
    assert "resumes from step 3" in res.stdout
    res = ftdiff("train", "--dry-run", "--set", _url(committed), "--set", "run.seed=1", *ports)
    assert res.returncode == EXIT_USAGE and "run.seed" in one_line(res.stderr)
    res = ftdiff("train", "--dry-run", "--set", _url(committed), "--set", 'checkpoint.resume="never"', *ports)
    assert res.returncode == EXIT_USAGE and "never" in one_line(res.stderr)
    # Pinned inside the root itself, at its newest step: the own history, held to the same math.
    pinned = ["--set", f'checkpoint.resume="{committed}/step-000000003"']
    res = ftdiff("train", "--dry-run", "--set", _url(committed), *pinned, "--set", "train.max_steps=9", *ports)
    assert res.returncode == EXIT_OK and "pinned by checkpoint.resume" in res.stdout, res.stderr
    res = ftdiff("train", "--dry-run", "--set", _url(committed), *pinned, "--set", "train.lr=0.1", *ports)
    assert res.returncode == EXIT_USAGE and "train.lr" in one_line(res.stderr)
    assert _listing(committed) == before  # no probe, pointer or incarnation left behind


@pytest.mark.timeout(120)
def test_dry_run_of_a_fork_refuses_what_the_fork_would_refuse(committed, tmp_path):
    """--from: another architecture and a fork that would train nothing are refused by the dry
    run as by the workers; a good fork passes."""
    fork = ["--from", f"{committed}/step-000000003", "--set", _url(tmp_path / "fork" / "checkpoints"),
            "--set", "supervisor.port=0", "--set", "metrics.port=0"]
    res = ftdiff("train", "--dry-run", *fork, "--set", "train.max_steps=10", "--set", "train.lr=1e-3")
    assert res.returncode == EXIT_OK, res.stderr
    assert "starts from" in res.stdout
    res = ftdiff("train", "--dry-run", *fork, "--set", "train.max_steps=10", "--set", "model.arch.layers_per_block=2")
    assert res.returncode == EXIT_USAGE and "another architecture" in one_line(res.stderr)
    res = ftdiff("train", "--dry-run", *fork, "--set", "train.max_steps=3")
    assert res.returncode == EXIT_USAGE and "would train nothing" in one_line(res.stderr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags", [["--nproc-per-node", "3"], ["--set", "model.sample_size=9"],
                                   ["--nnodes", "2", "--set", "supervisor.min_nodes=3"]])
def test_dry_run_with_bad_geometry_is_exit_2(tmp_path, flags):
    res = ftdiff("train", "--dry-run", "--set", _url(tmp_path / "run"), *flags)
    assert res.returncode == EXIT_USAGE
    one_line(res.stderr)
    assert "geometry" not in res.stdout.split("config", 1)[1] and not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_dry_run_with_a_port_in_use_is_exit_2(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        res = ftdiff("train", "--dry-run", "--set", _url(tmp_path / "run"), "--set", f"metrics.port={port}",
                     "--set", "supervisor.port=0")
    assert res.returncode == EXIT_USAGE and str(port) in one_line(res.stderr)


@pytest.mark.timeout(60)
def test_dry_run_on_a_store_that_refuses_writes_is_exit_3(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    real = MemoryFileSystem.pipe_file

    def denying(self, path, value, **kwargs):  # type: ignore[no-untyped-def]
        if PROBE_PREFIX in str(path):
            raise PermissionError("Access Denied")
        return real(self, path, value, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", denying)
    # One process: memory:// is one process's memory (a job of several is refused, exit 2).
    res = ftdiff("train", "--dry-run", "--nproc-per-node", "1", "--set", _url(f"memory://ro-{uuid.uuid4().hex[:8]}/run"),
                 "--set", "supervisor.port=0", "--set", "metrics.port=0")
    assert res.returncode == EXIT_STORAGE and "write access denied" in one_line(res.stderr)


@pytest.mark.timeout(90)
def test_dry_run_on_an_unreachable_store_is_exit_3(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    res = ftdiff("train", "--dry-run", "--set", _url("s3://bucket/run"),
                 "--set", f'checkpoint.endpoint_url="http://127.0.0.1:{free_port()}"')
    line = one_line(res.stderr)
    assert res.returncode == EXIT_STORAGE and "unreachable" in line and SECRET not in res.stderr


@pytest.mark.timeout(20)
def test_dry_run_and_print_config_are_exclusive():
    res = ftdiff("train", "--dry-run", "--print-config")
    assert res.returncode == EXIT_USAGE and "not allowed with" in res.stderr


@pytest.mark.timeout(60)
def test_dry_run_leaves_an_existing_root_as_it_was(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    res = ftdiff("train", "--dry-run", "--set", _url(root), "--set", "supervisor.port=0", "--set", "metrics.port=0")
    assert res.returncode == EXIT_OK and root.is_dir() and os.listdir(root) == []
    assert Catalog(open_storage(str(root))).step_folders() == []


@pytest.mark.timeout(30)
def test_a_fork_inside_its_parents_root_is_refused(tmp_path, monkeypatch):
    from service.cli.train_cmds import check_fork_root

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="its parent's root"):
        check_fork_root(load_config(None, ['checkpoint.url="runs/base/checkpoints/sub"']), "runs/base/checkpoints")
    with pytest.raises(UserError, match="its parent's root"):
        check_fork_root(load_config(None, [f'checkpoint.url="{tmp_path}/runs/base/checkpoints/x/y"']),
                        "runs/base/checkpoints/step-4")
    check_fork_root(load_config(None, ['checkpoint.url="runs/base/checkpoints-2"']), "runs/base/checkpoints")
    with pytest.raises(UserError, match="its parent's root"):
        check_fork_root(load_config(None, ['checkpoint.url="s3://b/run/sub"']), "s3://b/run/")
