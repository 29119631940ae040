"""With 2 ranks, each snapshot copies only the tensors DCP has that rank write, and the
checkpoint still holds exactly the state at the save, also when weights change right after;
a wrong guess of the share fails that save cleanly instead of writing moved-on weights."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from service.supervisor.torchrun import free_port


def _rank(rank: int, port: int, url: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from service.checkpoint.manager import Checkpointer
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.state import ModelState, OptimizerState, TrainState

    torch.manual_seed(0)  # replicated, as under DDP
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = load_config(None, [f'checkpoint.url="{url}"', "checkpoint.every_steps=1"])
    registry = {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "train_state": TrainState()}
    ckpt = Checkpointer(cfg, DistInfo(rank, 2, rank, torch.device("cpu"), "0"), registry, per_rank_keys=(),
                        can_read_state=lambda: bool(opt.state))

    def step() -> None:
        model(torch.ones(2, 16)).sum().backward()
        opt.step()
        opt.zero_grad()

    report: dict = {"staged": [], "committed": []}
    for n in (1, 2, 3, 4):
        step()
        if n == 3 and rank == 0:
            ckpt.staging.share = set()  # a wrong guess: DCP will ask this rank for tensors it did not copy
        ckpt.save_at(n, 0, blocking=False)
        ckpt.before_update()
        report["saved"] = {k: v.tolist() for k, v in model.state_dict().items()}
        with torch.no_grad():  # weights move on while the write may still be in flight
            for p in model.parameters():
                p.add_(100)
        report["committed"].append(ckpt.wait())
        report["staged"].append(sorted(ckpt.staging.buffers))
    report["share"] = sorted(ckpt.staging.share or [])
    ckpt.close()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_each_rank_stages_only_its_share(tmp_path):
    url, out = str(tmp_path / "ckpt"), str(tmp_path / "report")
    mp.spawn(_rank, args=(free_port(), url, out), nprocs=2, join=True)
    reports = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    shares = [set(r["share"]) for r in reports]
    big = {name for name in shares[0] | shares[1] if name.endswith((".weight", ".exp_avg", ".exp_avg_sq"))}
    assert shares[0] and shares[1] and not (shares[0] & shares[1] & big)
    for r, share in zip(reports, shares):
        # Buffers are kept for this rank's share only (the first save staged everything, not
        # knowing the share yet, then dropped the rest), and the share is a part of the state.
        assert set(r["staged"][0]) == set(r["staged"][1]) == set(r["staged"][3]) == share
        assert share & big and share < shares[0] | shares[1]
        # The wrong guess failed that save on every rank, cleanly; the next one learnt and committed.
        assert r["committed"] == [True, True, False, True]

    from service.checkpoint.manager import Checkpointer
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.state import ModelState, OptimizerState, TrainState

    torch.manual_seed(5)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = load_config(None, [f'checkpoint.url="{url}"'])
    registry = {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "train_state": TrainState()}
    fresh = Checkpointer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"), registry, per_rank_keys=(),
                         can_read_state=lambda: bool(opt.state))
    assert fresh.resume() == 4
    for name, value in model.state_dict().items():
        assert value.tolist() == reports[0]["saved"][name], name
    fresh.close()
