"""Training throughput on CPU: ftdiff's worker at world size 1 and 2 vs a plain loop.

For each preset (tiny, small): samples/s of the real training step (data pipeline, DDP, EMA,
clipping) at world size 1 and 2 with the same per-rank batch, and of a plain single-process
loop (model + AdamW + MSE, nothing else) over the same model and batch, all in this run.
ddp_efficiency_2_ranks = samples/s at 2 ranks / (2 x the same step in one process, no DDP);
vs_bare_loop_2_ranks = samples/s at 2 ranks / (2 x the bare loop). Prints one JSON line.

Usage: python bench/train_throughput.py [--steps 30] [--batch 8] [--presets tiny,small]
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


def _config(preset: str, batch: int, world: int, steps: int):  # type: ignore[no-untyped-def]
    from service.config import load_config

    return load_config(None, [
        f'model.preset="{preset}"', f"train.global_batch_size={batch * world}",
        f"train.max_steps={steps}", "checkpoint.every_steps=100000", "train.log_every=100000",
        f'checkpoint.url="memory://bench-{os.getpid()}"', 'checkpoint.resume="never"',
    ])


def measure_trainer(rank: int, world: int, port: int, preset: str, batch: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from service.data.stream import build_loader
    from service.dist import cleanup_distributed, init_distributed
    from service.launch_env import LaunchEnv
    from service.train.loop import Trainer

    info = init_distributed(LaunchEnv.read(), 300.0)
    trainer = Trainer(_config(preset, batch, world, steps), info)
    loader = iter(build_loader(trainer.samples, 0, steps, batch * world, rank, world, 0))
    warmup = 3
    for i, batch_data in enumerate(loader):
        if i == warmup:
            t0 = time.perf_counter()
        trainer._train_step(batch_data)
        trainer._agree(torch.tensor(0.0))  # the per-step sync of the real loop
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"samples_per_s": (steps - warmup) * batch * world / elapsed}))
    trainer.close()
    cleanup_distributed()


def plain_loop(preset: str, batch: int, steps: int) -> float:
    """Model + AdamW + MSE on a fixed batch, one thread: the yardstick for DDP efficiency."""
    from service.models.build import build_model, sample_size

    torch.set_num_threads(1)
    cfg = _config(preset, batch, 1, steps)
    model = build_model(cfg.model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = sample_size(cfg.model)
    x, noise = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    t = torch.randint(0, 1000, (batch,))
    warmup = 3
    for i in range(steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warmup) * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch")
    p.add_argument("--presets", default="tiny,small")
    args = p.parse_args()
    from service.supervisor.torchrun import free_port

    result: dict[str, dict[str, float]] = {}
    for preset in args.presets.split(","):
        r: dict[str, float] = {"plain_loop_samples_per_s": plain_loop(preset, args.batch, args.steps)}
        for world in (1, 2):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                mp.spawn(measure_trainer, args=(world, free_port(), preset, args.batch, args.steps, out.name),
                         nprocs=world, join=True)
                r[f"ws{world}_samples_per_s"] = json.loads(Path(out.name).read_text())["samples_per_s"]
        r["ddp_efficiency_2_ranks"] = r["ws2_samples_per_s"] / (2 * r["ws1_samples_per_s"])
        r["vs_bare_loop_2_ranks"] = r["ws2_samples_per_s"] / (2 * r["plain_loop_samples_per_s"])
        r["ws1_vs_plain"] = r["ws1_samples_per_s"] / r["plain_loop_samples_per_s"]
        result[preset] = {k: round(v, 3) for k, v in r.items()}
    print(json.dumps({"per_rank_batch": args.batch, "steps": args.steps, "cpu_threads_per_rank": 1, **result}))


if __name__ == "__main__":
    main()
