"""Training throughput on CPU: ftdiff's worker at world size 1 and 2 vs a plain loop, per model.

For each model (``--models``: a family and preset, class- or text-conditional, latent):
samples/s of the real training step (data pipeline, labels or captions, VAE and text encode,
DDP, EMA, clipping) at world size 1 and 2 with the same per-rank batch, and of a plain
single-process loop (the same model, VAE and text encode, AdamW and MSE, nothing else) over the
same batch, all in this run.
ws1_vs_plain = ftdiff's step at one rank / the bare loop (goal >= 0.95);
ddp_efficiency_2_ranks = samples/s at 2 ranks / (2 x the same step in one process, no DDP);
vae_encode_share (vae_and_text_encode_share) = the frozen encoders' share of a bare latent
step; allreduce_s = two processes all-reducing the model's gradients over gloo in DDP's 25 MB
buckets, alone; ddp_ceiling_2_ranks = the one-rank step / (that step + allreduce_s), what DDP
efficiency can reach when compute and communication share the cores (no overlap).
Prints one JSON line.

Usage: python bench/train_throughput.py [--steps 30] [--batch 8] [--models unet:tiny,dit-latent:tiny]
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


# model name -> its settings (a tiny VAE is made for the latent ones: no download)
MODELS = {
    "unet": [],
    "unet-class": ['model.conditioning="class"', "model.num_classes=3"],
    "dit": ['model.family="dit"', 'model.conditioning="class"', "model.num_classes=3"],
    "dit-latent": ['model.family="dit"', 'model.conditioning="class"', "model.num_classes=3", "model.sample_size=8",
                   "VAE"],
    # Stable Diffusion's shape: text-conditional UNet on latents, captions through a tiny CLIP.
    "unet-text-latent": ['model.family="unet-cond"', 'model.conditioning="text"', "model.sample_size=8", "VAE",
                         "TEXT"],
}


def _config(model: str, batch: int, world: int, steps: int, frozen: dict[str, str]):  # type: ignore[no-untyped-def]
    """``frozen``: the paths of the tiny VAE ("VAE") and text encoder ("TEXT")."""
    from service.config import load_config

    name, _, preset = model.partition(":")
    keys = {"VAE": "model.vae", "TEXT": "model.text_encoder"}
    settings = [f'{keys[s]}="{frozen[s]}"' if s in keys else s for s in MODELS[name]]
    return load_config(None, [
        f'model.preset="{preset or "tiny"}"', f"train.global_batch_size={batch * world}",
        f"train.max_steps={steps}", "checkpoint.every_steps=100000", "train.log_every=100000",
        f'checkpoint.url="{tempfile.gettempdir()}/ftdiff-bench-{os.getppid() if world > 1 else os.getpid()}"',
        'checkpoint.resume="never"', "checkpoint.memory_tier=false", *settings,
    ])


def measure_trainer(rank: int, world: int, port: int, model: str, batch: int, steps: int, out: str,
                    frozen: dict[str, str]) -> None:
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
    trainer = Trainer(_config(model, batch, world, steps, frozen), info)
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


def measure_allreduce(rank: int, world: int, port: int, numel: int, out: str) -> None:
    """Seconds per all-reduce of ``numel`` float32 gradients, in DDP's default bucket size."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per_bucket = 25 * 2**20 // 4
    buckets = [torch.ones(min(per_bucket, numel - start)) for start in range(0, numel, per_bucket)]
    rounds = 8
    for i in range(rounds + 2):  # 2 warm-up rounds
        if i == 2:
            t0 = time.perf_counter()
        for work in [dist.all_reduce(b, async_op=True) for b in buckets]:
            work.wait()
    if rank == 0:
        Path(out).write_text(json.dumps({"allreduce_s": (time.perf_counter() - t0) / rounds}))
    dist.destroy_process_group()


def plain_loop(model_name: str, batch: int, steps: int, frozen: dict[str, str]) -> tuple[float, float]:
    """The same model (and VAE and text encode) + AdamW + MSE on a fixed batch, one thread: the
    yardstick. (samples/s, the frozen encoders' share of the step time)."""
    from service.models.build import build_model, forward, image_size, input_channels, sample_size
    from service.models.latent import encode, load_vae, vae_geometry
    from service.models.text import load_text_encoder

    torch.set_num_threads(1)
    cfg = _config(model_name, batch, 1, steps, frozen)
    model = build_model(cfg.model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side, pixels = sample_size(cfg.model), image_size(cfg.model)
    x = torch.randn(batch, 3, pixels, pixels)
    noise = torch.randn(batch, input_channels(cfg.model), side, side)
    t = torch.randint(0, 1000, (batch,))
    labels = torch.randint(0, 3, (batch,)) if cfg.model.conditioning == "class" else None
    text = load_text_encoder(cfg.model.text_encoder) if cfg.model.text_encoder else None
    captions = [f"a red {('circle', 'square', 'triangle')[i % 3]}" for i in range(batch)]
    vae = load_vae(cfg.model.vae) if cfg.model.vae else None
    warmup, encoding = 3, 0.0
    for i in range(steps):
        if i == warmup:
            t0, encoding = time.perf_counter(), 0.0
        start = time.perf_counter()
        inputs = encode(vae, x, vae_geometry(cfg.model.vae)) if vae is not None else x
        cond = text(captions) if text is not None else labels
        encoding += time.perf_counter() - start
        loss = torch.nn.functional.mse_loss(forward(cfg.model, model, inputs + noise, t, cond), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    return (steps - warmup) * batch / elapsed, encoding / elapsed


def _parameter_count(model_name: str, frozen: dict[str, str]) -> int:
    """The trained parameters of the model (what DDP all-reduces), built on the meta device."""
    from service.models.build import build_model

    with torch.device("meta"):
        model = build_model(_config(model_name, 1, 1, 1, frozen).model, 0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch")
    p.add_argument("--models", default="unet:tiny,unet-class:tiny,dit:tiny,dit-latent:tiny,unet-text-latent:tiny",
                   help=f"family[:preset] of {', '.join(MODELS)}")
    args = p.parse_args()
    from service.supervisor.torchrun import free_port
    from tests.helpers import tiny_text_encoder, tiny_vae

    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        frozen = {"VAE": str(tiny_vae(Path(scratch) / "vae")), "TEXT": str(tiny_text_encoder(Path(scratch) / "clip"))}
        for model in args.models.split(","):
            plain, encode_share = plain_loop(model, args.batch, args.steps, frozen)
            r: dict[str, float] = {"plain_loop_samples_per_s": plain}
            if "latent" in model:  # the frozen VAE's (and text encoder's) share of a bare step
                r["vae_encode_share" if "text" not in model else "vae_and_text_encode_share"] = encode_share
            for world in (1, 2):
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    mp.spawn(measure_trainer, args=(world, free_port(), model, args.batch, args.steps, out.name, frozen),
                             nprocs=world, join=True)
                    r[f"ws{world}_samples_per_s"] = json.loads(Path(out.name).read_text())["samples_per_s"]
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                mp.spawn(measure_allreduce, args=(2, free_port(), _parameter_count(model, frozen), out.name),
                         nprocs=2, join=True)
                r["allreduce_s"] = json.loads(Path(out.name).read_text())["allreduce_s"]
            step_s = args.batch / r["ws1_samples_per_s"]
            r["ddp_ceiling_2_ranks"] = step_s / (step_s + r["allreduce_s"])
            r["ddp_efficiency_2_ranks"] = r["ws2_samples_per_s"] / (2 * r["ws1_samples_per_s"])
            r["vs_bare_loop_2_ranks"] = r["ws2_samples_per_s"] / (2 * r["plain_loop_samples_per_s"])
            r["ws1_vs_plain"] = r["ws1_samples_per_s"] / r["plain_loop_samples_per_s"]
            result[model] = {k: round(v, 4 if k == "allreduce_s" else 3) for k, v in r.items()}
    print(json.dumps({"per_rank_batch": args.batch, "steps": args.steps, "cpu_threads_per_rank": 1, **result}))


if __name__ == "__main__":
    main()
