"""The cost of the replica check (issue 25 goal 3): the real check of the worker — bit checksums
of every weight and optimizer moment, all-gathered and compared — against the real training
step, both measured in this run, at world size 2 (gloo on CPU; NCCL where CUDA is).

check_share_at_default = check time / (divergence.replica_check_every x step time), the share of
training time the check costs at the default interval (goal < 0.01 on the `small` preset).
Prints one JSON line.

Usage: python bench/replica_check.py [--preset small] [--steps 12] [--checks 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(rank: int, world: int, port: int, preset: str, batch: int, steps: int, checks: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from service.config import load_config
    from service.data.stream import build_loader
    from service.dist import cleanup_distributed, init_distributed
    from service.launch_env import LaunchEnv
    from service.train.loop import Trainer

    cfg = load_config(None, [
        f'model.preset="{preset}"', f"train.global_batch_size={batch * world}", f"train.max_steps={steps}",
        "checkpoint.every_steps=100000", "train.log_every=100000", 'checkpoint.resume="never"',
        f'checkpoint.url="{tempfile.gettempdir()}/ftdiff-bench-replicas-{os.getppid()}"',
        "checkpoint.memory_tier=false", "logging.tensorboard=false", "logging.sample_every=0",
    ])
    info = init_distributed(LaunchEnv.read(), 300.0)
    trainer = Trainer(cfg, info)
    warmup = 2
    for i, data in enumerate(build_loader(trainer.samples, 0, steps, batch * world, rank, world, 0)):
        if i == warmup:
            t0 = time.perf_counter()
        trainer._train_step(data)
        trainer._agree(torch.tensor(0.0))
    step_s = (time.perf_counter() - t0) / (steps - warmup)
    replicas = trainer.guard.replicas
    assert replicas.verify(steps, 0) is None  # warm, and the replicas agree
    t0 = time.perf_counter()
    for _ in range(checks):
        assert replicas.verify(steps, 0) is None
    check_s = (time.perf_counter() - t0) / checks
    if rank == 0:
        tensors = sum(1 for _ in trainer.model.parameters()) * 4  # weight + step, exp_avg, exp_avg_sq
        Path(out).write_text(json.dumps({
            "step_s": step_s, "check_s": check_s, "tensors_checked": tensors,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "default_interval": cfg.divergence.replica_check_every,
            "check_share_at_default": check_s / (cfg.divergence.replica_check_every * step_s),
        }))
    trainer.close()
    cleanup_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--checks", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch")
    args = p.parse_args()
    from service.supervisor.torchrun import free_port

    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "result.json")
        mp.spawn(measure, args=(2, free_port(), args.preset, args.batch, args.steps, args.checks, out), nprocs=2)
        result = json.loads(Path(out).read_text())
    result.update(preset=args.preset, batch_per_rank=args.batch, world_size=2,
                  device="cuda" if torch.cuda.is_available() else "cpu", goal_share=0.01)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
