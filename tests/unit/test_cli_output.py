"""The CLI's everyday output: --version, help texts, ``env``, ``ckpt ls`` tables, ``ckpt prune
--dry-run`` and the progress bars (drawn on a terminal only)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.retention import retention_plan
from service.checkpoint.storage import open_storage
from service.cli import build_parser, main
from service.cli.common import human_bytes, human_time
from service.errors import EXIT_OK, EXIT_USAGE
from tests.helpers import FTDIFF, committed_root, ftdiff_subprocess
from tests.helpers import ftdiff_inprocess as ftdiff


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> str:
    """A local root with committed steps 1..4 (a small model, in this process)."""
    return committed_root(str(tmp_path_factory.mktemp("output") / "run"), 4)


# -- --version, help, env ------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_version_matches_the_package_metadata():
    res = ftdiff("--version")
    assert res.returncode == EXIT_OK and res.stdout.strip() == f"ftdiff {metadata.version('ftdiff')}"


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_console_script_and_module_entry_both_work():
    for entry in ((FTDIFF,), (sys.executable, "-m", "service.cli")):
        res = ftdiff_subprocess("--version", timeout=50, entry=entry)
        assert res.returncode == 0 and res.stdout.startswith("ftdiff "), (entry, res.stderr)


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


@pytest.mark.timeout(20)
def test_every_flag_has_help_and_defaults_are_shown():
    parsers = _parsers(build_parser())
    assert len(parsers) >= 12
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers for a in p._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
    sample = next(p for p in parsers if p.prog == "ftdiff sample").format_help()
    assert "(default: 16)" in sample and "(default: ema)" in sample and "(default: 0)" in sample
    train = next(p for p in parsers if p.prog == "ftdiff train").format_help()
    assert "--print-config" in train and "--dry-run" in train and "(default: auto)" in train


@pytest.mark.timeout(60)
def test_env_json_parses_and_names_torch(capsys):
    import torch

    assert main(["env", "--json"]) == EXIT_OK
    body = json.loads(capsys.readouterr().out)
    assert body["torch"] == torch.__version__ and body["ftdiff"] == metadata.version("ftdiff")
    assert body["python"] == ".".join(map(str, sys.version_info[:3]))
    assert body["cuda"]["available"] == torch.cuda.is_available() and isinstance(body["cuda"]["devices"], list)
    assert set(body["nccl"]) >= {"available", "version"} and isinstance(body["mps"], bool)
    for dist in ("diffusers", "fsspec", "s3fs", "prometheus-client", "pydantic", "numpy"):
        assert body[dist] == metadata.version(dist)
    assert body["cpu_count"] >= 1
    assert main(["env"]) == EXIT_OK
    human = capsys.readouterr().out
    assert "torch" in human and torch.__version__ in human and "cuda" in human and "nccl" in human


# -- ckpt ls ------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_human_sizes_and_times():
    assert [human_bytes(n) for n in (0, 1023, 1024, 12_900_000, 5 * 1024**3)] == \
        ["0 B", "1023 B", "1.0 KiB", "12.3 MiB", "5.0 GiB"]
    assert human_time(0) == "-" and human_time(None) == "-"
    assert human_time(1_700_000_000) == "2023-11-14 22:13:20 UTC"


@pytest.mark.timeout(60)
def test_ls_has_a_header_and_human_sizes_and_json_is_unchanged(committed):
    res = ftdiff("ckpt", "ls", committed)
    assert res.returncode == EXIT_OK, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATE", "SIZE", "TIME", "PATH"]
    rows = lines[1:-1]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    assert all("committed" in r and "KiB" in r and "UTC" in r for r in rows)
    assert lines[-1].startswith("4 checkpoint folder(s)") and "newest committed: step 4" in lines[-1]
    res = ftdiff("ckpt", "ls", committed, "--json")
    infos = Catalog(open_storage(committed)).describe()
    assert res.stdout == json.dumps([i.to_json() for i in infos]) + "\n"
    assert [sorted(e) for e in json.loads(res.stdout)] == [sorted(["step", "committed", "path", "bytes", "time"])] * 4


@pytest.mark.timeout(60)
def test_show_prints_the_config_fingerprint_and_utc_time_it_was_trained_with(committed):
    res = ftdiff("ckpt", "show", committed)
    assert res.returncode == EXIT_OK, res.stderr
    shown = json.loads(res.stdout)
    assert shown["time_utc"].endswith(" UTC") and shown["step"] == 4
    assert shown["config"]["train"]["max_steps"] > 0 and shown["config"]["supervisor"]["token"] in (None, "***")
    assert shown["fingerprint"] and shown["skips"] == [] and shown["suspect_since"] is None


# -- ckpt prune --dry-run -----------------------------------------------------------------------
def _tree(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.mark.timeout(60)
def test_prune_dry_run_deletes_nothing_and_names_what_prune_deletes(committed, tmp_path):
    root = str(tmp_path / "run")
    shutil.copytree(committed, root)
    before = _tree(root)
    res = ftdiff("ckpt", "prune", root, "--keep-last", "2", "--dry-run", "--json")
    assert res.returncode == EXIT_OK, res.stderr
    plan = json.loads(res.stdout)
    assert plan == {"dry_run": True, "would_delete": [1, 2], "kept": [3, 4]}
    table = ftdiff("ckpt", "prune", root, "--keep-last", "2", "--dry-run").stdout  # the same, for people
    assert table.splitlines()[0] == "would delete: 2 checkpoint folder(s):" and f"{root}/step-000000003" in table
    assert _tree(root) == before
    assert retention_plan(Catalog(open_storage(root)), 2, 0) == [1, 2]
    res = ftdiff("ckpt", "prune", root, "--keep-last", "2", "--json")
    assert json.loads(res.stdout) == {"deleted": plan["would_delete"], "failed": []}
    assert Catalog(open_storage(root)).committed_steps() == plan["kept"]
    res = ftdiff("ckpt", "prune", root, "--keep-last", "2", "--keep-every", "3", "--dry-run", "--json")
    assert json.loads(res.stdout)["would_delete"] == [] and Catalog(open_storage(root)).step_folders() == [3, 4]
    res = ftdiff("ckpt", "prune", root, "--keep-last", "1")  # as checkpoint.keep_last: at least 2
    assert res.returncode == EXIT_USAGE and "keep at least 2" in res.stderr


# -- progress bars ------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.timeout(60)
def test_no_bars_when_stderr_is_not_a_terminal(committed):
    res = ftdiff("ckpt", "verify", committed)
    assert res.returncode == EXIT_OK and res.stderr == "" and res.stdout.startswith("OK ")


@pytest.mark.timeout(60)
def test_verify_draws_a_bar_on_a_terminal(committed, monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["ckpt", "verify", committed]) == EXIT_OK
    assert capsys.readouterr().out.startswith("OK ")
    assert "verify" in terminal.getvalue()


@pytest.mark.timeout(60)
def test_step_bar_and_sampling_callback(monkeypatch):
    from service.cli.progress import step_progress
    from service.config import load_config
    from service.models.build import build_model
    from service.sample import generate

    cfg = load_config(None, [])
    done: list[int] = []
    images = generate(build_model(cfg.model, 0), cfg, 1, steps=3, on_step=done.append)
    assert done == [1, 2, 3] and images.shape[0] == 1
    with step_progress("sample", 3) as on_step:  # not a terminal: a no-op callback
        on_step(1)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with step_progress("sample", 3) as on_step:
        for step in (1, 2, 3):
            on_step(step)
    assert "sample" in terminal.getvalue()
