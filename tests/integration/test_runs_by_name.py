"""Runs by name (issue 26): without checkpoint.url a run lives under runs/<run.name>/ — its
checkpoints, TensorBoard events and status together — so two names never share a root or logs,
and `ftdiff runs ls` lists them with their state and newest step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY, base_env, set_args


def _train(cwd, name: str, *extra: str, env: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
           cli: list[str] | None = None) -> subprocess.CompletedProcess:
    args = [a for a in TINY if not a.startswith("logging.tensorboard")] + [
        f'run.name="{name}"', "train.max_steps=3", "checkpoint.every_steps=2", "supervisor.port=0",
        "metrics.port=0", *extra]
    return subprocess.run([sys.executable, "-m", "service.cli", "train", "--nproc-per-node", "1", *(cli or []),
                           *set_args(args)],
                          cwd=cwd, env=base_env({"PYTHONPATH": str(REPO), **(env or {})}), capture_output=True,
                          text=True, timeout=200)


@pytest.mark.timeout(400)
def test_two_names_two_roots_separate_logs_and_runs_ls_shows_their_state(tmp_path):
    for name in ("exp-a", "exp-b"):
        res = _train(tmp_path, name)
        assert res.returncode == 0, res.stderr[-2000:]
    failed = _train(tmp_path, "exp-c", "supervisor.max_restarts=0", env={"FTDIFF_FAIL_AT_STEP": "2"})
    assert failed.returncode != 0
    runs = tmp_path / "runs"
    for name in ("exp-a", "exp-b"):
        assert (runs / name / "checkpoints" / "step-000000003" / "manifest.json").is_file()
        assert any((runs / name / "tensorboard").iterdir())  # each run its own event files
    assert not (runs / "ftdiff").exists()  # the default name's root was not touched

    res = subprocess.run([sys.executable, "-m", "service.cli", "runs", "ls", "--json"], cwd=tmp_path,
                         env=base_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = {r["name"]: r for r in json.loads(res.stdout)}
    assert {n: (r["state"], r["step"]) for n, r in listed.items()} == {
        "exp-a": ("finished", 3), "exp-b": ("finished", 3), "exp-c": ("failed", None)}
    assert listed["exp-a"]["checkpoint_url"] == str(tmp_path / "runs/exp-a/checkpoints")  # absolute: readable from anywhere
    table = subprocess.run([sys.executable, "-m", "service.cli", "runs", "ls"], cwd=tmp_path,
                           env=base_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=60).stdout
    assert table.splitlines()[0].split() == ["NAME", "STATE", "STEP", "UPDATED", "FORKED", "FROM", "CHECKPOINTS"]
    assert "exp-b" in table and "3/3" in table


def _position(url: str) -> int:
    """The data position the newest commit of ``url`` records."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from service.checkpoint.catalog import Catalog
    from service.checkpoint.dcp_io import VerifyingReader
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.storage import open_storage

    catalog = Catalog(open_storage(url))
    step, manifest = catalog.latest()  # type: ignore[misc]
    request = {"data": {"position": torch.tensor(-1)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(request, storage_reader=VerifyingReader.for_folder(catalog.storage, step_dir(step), manifest.files))
    return int(request["data"]["position"])


@pytest.mark.timeout(400)
def test_a_fork_keeps_the_state_records_its_lineage_and_refuses_another_architecture(tmp_path):
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    assert _train(tmp_path, "parent").returncode == 0
    fork = ["--from", "runs/parent/checkpoints/step-000000003"]
    res = _train(tmp_path, "lower-lr", "train.max_steps=5", "train.lr=1e-4", cli=fork)
    assert res.returncode == 0, res.stderr[-2000:]
    step, manifest = Catalog(open_storage(str(tmp_path / "runs/lower-lr/checkpoints"))).latest()  # type: ignore[misc]
    assert step == 5 and manifest.lineage is not None
    assert manifest.lineage["step"] == 3
    parent_root = str((tmp_path / "runs/parent/checkpoints").resolve())  # given relative: recorded absolute
    assert manifest.lineage["parent_root"] == parent_root
    assert manifest.lineage["parent"] == f"{parent_root}/step-000000003"
    assert any(line.startswith("train.lr:") for line in manifest.lineage["changed"])
    assert _position(str(tmp_path / "runs/lower-lr/checkpoints")) == 5 * 8  # went on from the parent's position
    again = _train(tmp_path, "lower-lr", "train.max_steps=5", "train.lr=1e-4", cli=fork)  # the same command again
    assert again.returncode == 0, again.stderr[-2000:]  # continues the fork (done), not refused
    dry = _train(tmp_path, "lower-lr", "train.max_steps=5", "train.lr=1e-4", cli=[*fork, "--dry-run"])
    assert dry.returncode == 0 and "continues this fork" in dry.stdout, dry.stdout + dry.stderr[-2000:]
    # The fork continued with other math is a changed resume of the fork's own run: refused
    # before anything starts, by the dry run and by ftdiff train alike.
    for cli in ([*fork, "--dry-run"], fork):
        changed = _train(tmp_path, "lower-lr", "train.max_steps=7", "train.lr=3e-4", cli=cli)
        assert changed.returncode == 2 and "train.lr" in changed.stderr, changed.stdout + changed.stderr[-2000:]
        assert "torchrun agent" not in changed.stderr

    other_data = _train(tmp_path, "more-data", "train.max_steps=5", "data.epoch_size=72", cli=fork)
    assert other_data.returncode == 0, other_data.stderr[-2000:]
    assert _position(str(tmp_path / "runs/more-data/checkpoints")) == 2 * 8  # another stream starts at its start

    into_parent = _train(tmp_path, "parent", cli=fork)
    assert into_parent.returncode == 2 and "its parent's root" in into_parent.stderr
    nothing = _train(tmp_path, "nothing", cli=fork)  # max_steps 3: the parent's step already
    assert nothing.returncode == 2 and "would train nothing" in nothing.stderr, nothing.stderr[-2000:]
    both = _train(tmp_path, "both", 'checkpoint.resume="never"', cli=fork)
    assert both.returncode == 2 and "keep one" in both.stderr
    bigger = _train(tmp_path, "bigger", "model.arch.layers_per_block=2", cli=fork)
    assert bigger.returncode == 2 and "another architecture" in bigger.stderr, bigger.stderr[-2000:]

    listed = subprocess.run([sys.executable, "-m", "service.cli", "runs", "ls", "--json"], cwd=tmp_path,
                            env=base_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=60)
    lineage = {r["name"]: r["lineage"] for r in json.loads(listed.stdout)}
    assert lineage["parent"] is None and lineage["lower-lr"]["step"] == 3


@pytest.mark.timeout(300)
def test_a_changed_architecture_is_refused_once_before_any_process_starts(tmp_path):
    """The launcher runs the workers' start rules before it starts anything: one line naming the
    keyword, exit 2, no torchrun agent, no incarnation record, the run's status untouched."""
    assert _train(tmp_path, "exp").returncode == 0
    run = tmp_path / "runs" / "exp"
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    status = (run / "status.json").read_bytes()
    res = _train(tmp_path, "exp", "train.max_steps=5", "model.arch.layers_per_block=2")
    assert res.returncode == 2, res.stderr[-2000:]
    refusals = [line for line in res.stderr.splitlines() if line.startswith("ftdiff: ")]
    assert len(refusals) == 1 and "model.architecture.layers_per_block" in refusals[0], res.stderr[-2000:]
    assert "ftdiff train --from" in refusals[0]  # the way on, pasteable
    assert "torchrun agent" not in res.stderr and "Traceback" not in res.stderr
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / "status.json").read_bytes() == status


@pytest.mark.timeout(400)
def test_a_weights_only_fork_starts_at_step_0_from_the_parents_ema_and_may_change_what_fits(tmp_path):
    from safetensors.torch import load_file

    from service.checkpoint.catalog import Catalog
    from service.checkpoint.refs import CheckpointRef
    from service.checkpoint.storage import open_storage
    from service.weights import load_weights

    assert _train(tmp_path, "parent").returncode == 0
    fork = ["--from", "runs/parent/checkpoints", "--weights-only"]
    # max_steps 3 = the parent's step: a full-state fork would train nothing; this one starts at 0.
    # act_fn: another architecture keyword, but one whose weights have the same shapes.
    child = ["train.max_steps=3", "train.lr=1e-4", 'model.arch.act_fn="mish"']
    res = _train(tmp_path, "child", *child, cli=fork)
    assert res.returncode == 0, res.stderr[-2000:]
    root = str(tmp_path / "runs/child/checkpoints")
    steps = Catalog(open_storage(root)).committed_steps()
    assert steps[0] == 2 and steps[-1] == 3  # its own commits, from step 0 (every_steps=2)
    step, manifest = Catalog(open_storage(root)).latest()  # type: ignore[misc]
    assert manifest.lineage is not None and manifest.lineage["step"] == 3
    assert manifest.lineage["parent_root"] == str((tmp_path / "runs/parent/checkpoints").resolve())
    assert "weights only" in manifest.lineage["changed"][0]
    assert _position(root) == 3 * 8  # the data from its start: 3 steps of 8 samples

    # The weights it started from are the parent's EMA weights, bit for bit.
    init = manifest.config["model"]["init_from"]
    parent = Catalog(open_storage(str(tmp_path / "runs/parent/checkpoints")))
    _, ema = load_weights(CheckpointRef(parent, *parent.latest()), "ema")  # type: ignore[misc]
    exported = load_file(f"{init}/diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys() and all(exported[k].equal(ema[k]) for k in ema)

    # The parent trains on; the same command (its root spelled otherwise, even) continues the
    # child from its own commits, with the weights it started from: nothing exported again.
    assert _train(tmp_path, "parent", "train.max_steps=5").returncode == 0
    spelled = ["--from", str(tmp_path / "runs/parent/checkpoints/"), "--weights-only"]
    again = _train(tmp_path, "child", "train.max_steps=5", "train.lr=1e-4", 'model.arch.act_fn="mish"', cli=spelled)
    assert again.returncode == 0, again.stderr[-2000:]
    assert Catalog(open_storage(root)).latest()[0] == 5  # type: ignore[index]
    assert len(list((tmp_path / "runs/child/init-weights").iterdir())) == 1

    dry = _train(tmp_path, "dry", cli=[*fork, "--dry-run"])  # checks, writes nothing
    assert dry.returncode == 0 and not (tmp_path / "runs/dry").exists(), dry.stderr[-2000:]
    for cli in ([*fork, "--dry-run"], fork):  # the dry run refuses what training refuses
        misfit = _train(tmp_path, "bigger", "model.arch.layers_per_block=2", cli=cli)
        assert misfit.returncode == 2 and misfit.stderr.count("not fit") == 1, misfit.stderr[-2000:]
        assert not (tmp_path / "runs/bigger").exists()  # refused before anything was written
    alone = _train(tmp_path, "alone", cli=["--weights-only"])
    assert alone.returncode == 2 and "add --from" in alone.stderr
    listed = subprocess.run([sys.executable, "-m", "service.cli", "runs", "ls", "--json"], cwd=tmp_path,
                            env=base_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=60)
    assert {r["name"]: r["lineage"] for r in json.loads(listed.stdout)}["child"]["step"] == 3


@pytest.mark.timeout(400)
def test_a_fork_from_a_parent_whose_newest_checkpoint_is_corrupt_is_refused_with_the_way_on(tmp_path):
    """Full or weights-only, a fork from a root whose newest checkpoint cannot be loaded is exit 2
    naming it and pointing at the others (a full fork moved back to an older step unasked, with
    exit 0; weights-only was exit 1 with no advice). Pinning an older one then works."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.storage import open_storage

    assert _train(tmp_path, "parent", "train.max_steps=4").returncode == 0  # commits at steps 2 and 4
    parent = tmp_path / "runs/parent/checkpoints"
    newest = Catalog(open_storage(str(parent))).latest()[0]  # type: ignore[index]
    for shard in (parent / step_dir(newest)).glob("*.distcp"):
        shard.write_bytes(b"junk" * 1000)
    for name, cli in (("full", ["--from", "runs/parent/checkpoints"]),
                      ("weights", ["--from", "runs/parent/checkpoints", "--weights-only"])):
        res = _train(tmp_path, name, "train.max_steps=5", cli=cli)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "ftdiff ckpt ls runs/parent/checkpoints" in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "runs" / name / "checkpoints").exists()  # a refused start leaves no root
    older = _train(tmp_path, "older", "train.max_steps=3", cli=["--from", f"runs/parent/checkpoints/{step_dir(2)}"])
    assert older.returncode == 0, older.stderr[-2000:]
