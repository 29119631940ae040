"""The divergence detector on injected series, skip windows, replica checksums, and the
rollback target rules (no processes)."""

from __future__ import annotations

import math

import pytest
import torch

from service.checkpoint.catalog import Catalog
from service.checkpoint.manifest import FileEntry, Manifest
from service.checkpoint.rollback import rollback_target
from service.checkpoint.storage import open_storage
from service.data.skips import MAX_WINDOWS, Skips
from service.data.stream import RankBatchSampler
from service.train.divergence import MIN_HISTORY, SpikeDetector
from service.train.replicas import bit_checksum, state_checksums
from service.vocabulary import RollbackReason

pytestmark = pytest.mark.timeout(60)


def detector(**kw: float) -> SpikeDetector:
    args = {"factor": 5.0, "spike_steps": 3, "nonfinite_steps": 3, "history": 50, **kw}
    return SpikeDetector(**args)  # type: ignore[arg-type]


def feed(d: SpikeDetector, losses: list[float], first_step: int = 1, norm: float = 1.0) -> list:
    return [d.observe(first_step + i, loss, norm) for i, loss in enumerate(losses)]


def test_a_noisy_but_healthy_series_never_triggers():
    d = detector()
    series = [1.0 / (1 + 0.01 * i) * (1.5 if i % 7 == 0 else 1.0) for i in range(500)]
    assert all(v is None for v in feed(d, series))
    assert d.judging_since is None


def test_a_spike_of_three_steps_is_a_divergence_from_its_first_step():
    d = detector()
    feed(d, [1.0] * 20)
    assert d.observe(21, 50.0, 1.0) is None
    assert d.judging_since == 21  # being judged: a checkpoint now is marked
    assert d.observe(22, 60.0, 1.0) is None
    verdict = d.observe(23, 70.0, 1.0)
    assert verdict is not None and verdict.reason is RollbackReason.LOSS_SPIKE
    assert (verdict.first_step, verdict.last_step) == (21, 23)
    assert verdict.level == pytest.approx(1.0) and "70" in verdict.describe()


def test_a_short_spike_is_forgiven_and_does_not_raise_the_level():
    d = detector()
    feed(d, [1.0] * 20)
    assert feed(d, [50.0, 50.0, 1.0], first_step=21) == [None, None, None]
    assert d.judging_since is None
    verdicts = feed(d, [40.0] * 3, first_step=24)  # judged against 1.0, not against the spike
    assert verdicts[-1] is not None and verdicts[-1].first_step == 24


def test_a_gradient_norm_spike_counts_too():
    d = detector()
    for i in range(20):
        d.observe(i + 1, 1.0, 2.0)
    verdicts = [d.observe(21 + i, 1.0, 100.0) for i in range(3)]
    assert verdicts[-1] is not None and verdicts[-1].reason is RollbackReason.GRAD_SPIKE


def test_nothing_is_judged_before_the_history_is_long_enough():
    d = detector()
    assert all(v is None for v in feed(d, [1.0, 100.0, 1000.0, 1e4] + [1.0] * (MIN_HISTORY - 5)))


def test_non_finite_steps_in_a_row_diverge_and_a_finite_one_resets_the_count():
    d = detector(factor=0)  # spike detection off; NaN runs still judged
    assert feed(d, [math.nan, math.nan, 1.0, math.nan, math.inf]) == [None] * 5
    verdict = d.observe(6, math.nan, math.nan)
    assert verdict is not None and verdict.reason is RollbackReason.NONFINITE
    assert verdict.first_step == 4


def test_an_unknown_gradient_norm_is_no_evidence():
    """fp16: the grad scaler's overflow skips (an inf norm it handles) are passed as None."""
    d = detector()
    feed(d, [1.0] * 20)
    assert all(d.observe(21 + i, 1.0, None) is None for i in range(10))
    assert d.judging_since is None


def test_reset_forgets_the_history():
    d = detector()
    feed(d, [1.0] * 20)
    d.reset()
    assert all(v is None for v in feed(d, [100.0] * 5))


def test_skip_windows_merge_and_move_batch_starts_past_them():
    s = Skips([(10, 20)])
    s.add(30, 40)
    s.add(18, 31)  # bridges both
    assert s.windows == [(10, 40)]
    assert s.next_start(9, 1) == 9 and s.next_start(10, 1) == 40 and s.next_start(39, 1) == 40
    assert s.next_start(3, 8) == 40  # a batch that would run into a window begins past it
    assert s.next_start(2, 8) == 2  # [2, 10) ends where the window begins
    s.add(40, 48)  # touching: merged
    assert s.windows == [(10, 48)] and s.skipped_between(0, 20) == 10
    assert Skips.from_tensor(s.to_tensor()) == s
    with pytest.raises(ValueError):
        s.add(5, 5)
    many = Skips()
    with pytest.raises(ValueError):
        for i in range(MAX_WINDOWS + 1):
            many.add(10 * i, 10 * i + 1)


def test_a_window_inside_a_batch_is_never_trained_on():
    skips = Skips([(3, 5)])
    batches = [p for batch in RankBatchSampler(0, 2, 8, 0, 1, skips) for p in batch]
    assert batches == [*range(5, 21)]


def test_the_sampler_skips_the_same_positions_at_any_world_size():
    skips = Skips([(16, 40)])
    one = [p for batch in RankBatchSampler(0, 4, 8, 0, 1, skips) for p in batch]
    two = sorted(p for r in range(2) for batch in RankBatchSampler(0, 4, 8, r, 2, skips) for p in batch)
    assert one == two == [*range(0, 16), *range(40, 56)]


def test_one_flipped_bit_changes_the_checksum():
    t = torch.randn(1000)
    before = bit_checksum(t)
    t.view(torch.int32)[123] ^= 1 << 30
    assert bit_checksum(t) != before
    odd = torch.zeros(3, dtype=torch.float16)  # 6 bytes: summed as bytes
    assert bit_checksum(odd) == 0


def test_state_checksums_cover_the_optimizer_moments():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    before = state_checksums(model, opt)
    assert len(before) == 2 + 2 * 3  # weight, bias; step, exp_avg, exp_avg_sq each
    opt.state[model.weight]["exp_avg_sq"].view(-1)[0] += 1e-3
    assert not torch.equal(before, state_checksums(model, opt))


def _commit(catalog: Catalog, step: int, suspect_since: int | None = None) -> None:
    manifest = Manifest(step=step, world_size=1, config_hash="x", files={".metadata": FileEntry(0, "00000000")},
                        suspect_since=suspect_since)
    catalog.storage.write_bytes_atomic(f"step-{step:09d}/.metadata", b"")
    catalog.write_manifest(manifest)


def test_the_rollback_target_is_the_newest_unmarked_commit_at_or_before_the_bound():
    catalog = Catalog(open_storage("memory://rollback-target"))
    for step, suspect in [(3, None), (6, None), (9, 8), (12, 8)]:
        _commit(catalog, step, suspect)
    assert rollback_target(catalog, 12, set())[0] == 6  # 9 and 12 were taken while judging
    assert rollback_target(catalog, 5, set())[0] == 3
    assert rollback_target(catalog, 12, {6})[0] == 3  # 6 could not be loaded
    assert rollback_target(catalog, 2, set()) is None
    again = Manifest.from_json(catalog.manifest(9).to_json())
    assert again.suspect_since == 8


def test_checkpoints_from_before_skips_and_rollbacks_still_load_and_nothing_else_may_be_missing(tmp_path):
    """A checkpoint of an earlier release has no data.skips and no train_state.rollbacks: it
    loads with none of either. Any other missing entry still fails the load."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from service.checkpoint.load_planner import GrowingFormatLoadPlanner, MissingStateError
    from service.train.state import DataState, TrainState

    old = {"data": {"position": torch.tensor(48)},
           "train_state": {"step": torch.tensor(6), "samples_seen": torch.tensor(48), "epoch": torch.tensor(0)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(old, checkpoint_id=str(tmp_path))
        data, train = DataState(skips=Skips([(1, 2)])), TrainState()
        data.skips = Skips()
        dcp.load({"data": data, "train_state": train}, checkpoint_id=str(tmp_path),
                 planner=GrowingFormatLoadPlanner())
        assert (data.position, data.skips, train.step, train.rollbacks) == (48, Skips(), 6, 0)
        with pytest.raises(CheckpointException) as failed:
            dcp.load({"data": DataState(), "model": {"weight": torch.zeros(2)}}, checkpoint_id=str(tmp_path),
                     planner=GrowingFormatLoadPlanner())
    ((error, _frames),) = failed.value.failures.values()
    assert isinstance(error, MissingStateError) and "the checkpoint has no model.weight" in str(error)


def test_retention_keeps_the_newest_commit_a_rollback_may_go_back_to():
    """keep_last 2 while a spike from step 14 is judged: commits 14 and 15 are marked; 12 stays."""
    from service.checkpoint.retention import apply_retention, plan_deletions

    assert plan_deletions([9, 12, 14, 15], [], 2, 0, also_keep=12) == [9]
    catalog = Catalog(open_storage("memory://retention-suspect"))
    for step, suspect in [(9, None), (12, None), (14, 14), (15, 14)]:
        _commit(catalog, step, suspect)
    deleted, _ = apply_retention(catalog, 2, 0)
    assert deleted == [9] and catalog.committed_steps() == [12, 14, 15]
