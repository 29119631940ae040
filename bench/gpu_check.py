"""GPU check: base preset, nccl, world size 1, bf16 autocast — samples/s, peak GPU memory, and
the async checkpoint from GPU memory through pinned staging buffers (stall and commit time).

Run by bench/gpu_check.sh under torchrun; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    warnings.filterwarnings("ignore")
    from service.config import load_config
    from service.data.stream import build_loader
    from service.dist import cleanup_distributed, init_distributed
    from service.launch_env import LaunchEnv
    from service.train.loop import Trainer

    steps, warmup = 60, 10
    ckpt_dir = tempfile.mkdtemp(prefix="gpucheck-")
    cfg = load_config("base", [
        f"train.max_steps={steps}", "train.global_batch_size=64", "data.num_workers=4",
        f'checkpoint.url="{ckpt_dir}"', "checkpoint.every_steps=100000", 'checkpoint.resume="never"',
    ])
    info = init_distributed(LaunchEnv.read(), 300.0)
    trainer = Trainer(cfg, info)
    loader = build_loader(trainer.samples, 0, steps, 64, info.rank, info.world_size, 4)
    torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(loader):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        trainer._train_step(batch)
    torch.cuda.synchronize()
    rate = (steps - warmup) * 64 / (time.perf_counter() - t0)

    # Async save of the full state from GPU memory (pinned, reused staging buffers).
    ck = trainer.checkpointer
    ck.warm_up()  # pinned staging buffers allocated in the background, as the trainer does
    ck.drain()
    stalls, commits = [], []
    for step in (1, 2, 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ck.save_at(step, 0, blocking=False)
        ck.before_update()
        stalls.append(ck.last_stall_s)
        assert ck.wait(), "save did not commit"
        commits.append(time.perf_counter() - t0)
    state_mb = sum(b.numel() * b.element_size() for b in ck.staging.buffers.values()) / 1e6
    print(json.dumps({
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "preset": "base",
        "precision": "bf16", "world_size": info.world_size, "global_batch": 64,
        "samples_per_s": round(rate, 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "ckpt_state_mb": round(state_mb, 1), "ckpt_stall_s": round(sorted(stalls)[1], 4),
        "ckpt_commit_s": round(sorted(commits)[1], 3), "ckpt_pinned": bool(ck.staging.pin),
        **_resume_check(cfg, info, trainer),
    }))
    trainer.close()
    cleanup_distributed()


def _resume_check(cfg, info, trainer) -> dict:  # type: ignore[no-untyped-def]
    """A fresh trainer resumes the committed step through the safe, verifying reader onto the
    GPU (torch's own DCP path for accelerator destinations) and gets the weights bitwise."""
    from service.train.loop import Trainer

    fresh = Trainer(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": "auto"})}),
                    info)
    try:
        t0 = time.perf_counter()
        step = fresh.checkpointer.resume()
        load_s = time.perf_counter() - t0
        saved = trainer.checkpointer.catalog.manifest(step)
        same = all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(),
                                                      trainer.model.state_dict().values()))
        return {"resumed_step": step, "resume_load_s": round(load_s, 3), "resume_bitwise": same,
                "manifest_incarnation": saved.incarnation}
    finally:
        fresh.close()


if __name__ == "__main__":
    main()
