"""The step timer's communication hook: what it measures, and that it leaves DDP's math alone."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from service.train.step_timer import StepTimer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _grads(net: torch.nn.Module, x: torch.Tensor, timer: StepTimer | None = None) -> list[torch.Tensor]:
    if timer is not None:
        with timer.section():
            loss = net(x).square().mean()
    else:
        loss = net(x).square().mean()
    loss.backward()
    if timer is not None:
        timer.step_done()
    return [p.grad.clone() for p in net.parameters()]


def test_the_timed_all_reduce_gives_ddps_own_gradients_bit_for_bit(one_rank_group):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    x = torch.randn(8, 64)
    plain = DistributedDataParallel(copy.deepcopy(model), bucket_cap_mb=0.01)  # several buckets
    timed_net = DistributedDataParallel(copy.deepcopy(model), bucket_cap_mb=0.01)
    timer = StepTimer(torch.device("cpu"), timed_net)
    for _ in range(3):
        expected, got = _grads(plain, x), _grads(timed_net, x, timer)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        plain.zero_grad(), timed_net.zero_grad()
    assert timer.mean_s > 0 and timer.comm_mean_s > 0


def test_communication_is_the_span_from_the_first_bucket_to_the_last_reduced():
    from service.train.step_timer import _Marks

    marks = _Marks(cuda=False)
    marks.add(10.0, 10.5)  # buckets overlap: the step's communication is 10.0 .. 11.0
    marks.add(10.2, 11.0)
    marks.fold(span=True)
    assert marks.mean_s == pytest.approx(1.0)
    marks.add(20.0, 20.5)  # the next step: folded into the running mean
    marks.fold(span=True)
    assert marks.mean_s == pytest.approx(0.7 * 1.0 + 0.3 * 0.5)


def test_without_ddp_there_is_no_communication_to_time():
    timer = StepTimer(torch.device("cpu"), torch.nn.Linear(2, 2))
    with timer.section():
        pass
    timer.step_done()
    assert timer.comm_mean_s == 0.0


def _ranks_compare(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    grads = []
    for hooked in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
        ddp = DistributedDataParallel(net, bucket_cap_mb=0.01)
        if hooked:
            StepTimer(torch.device("cpu"), ddp)  # registers its all-reduce on ddp
        torch.manual_seed(100 + rank)  # each rank its own batch: the average is not trivial
        ddp(torch.randn(16, 64)).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(all(torch.equal(a, b) for a, b in zip(*grads))))
    dist.barrier()  # no rank tears the group down while a peer still talks to it
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a gloo thread torch leaves behind can abort it now and
    # then ("terminate called without an active exception"), after everything tested is done.
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_the_timed_all_reduce_is_ddps_arithmetic_at_any_world_size(tmp_path, world):
    """3 ranks: 1/3 is not exact, so scaling before or after the sum, or dividing instead of
    multiplying, would round differently from DDP's own all-reduce."""
    import torch.multiprocessing as mp

    out = tmp_path / "equal"
    mp.start_processes(_ranks_compare, args=(world, str(tmp_path / "store"), str(out)), nprocs=world,
                       start_method="spawn")
    assert out.read_text() == "True"
