"""GPU check of the model families (issue 23): a latent DiT-B/2 (256 px images through an
SD-shaped VAE, 32x32 latents, class labels) and a text-conditional UNet (unet-cond small on the
same latents, a CLIP-L-sized text encoder), each with bf16 autocast and torch.compile: the
first step's time (compilation), samples/s after it and peak GPU memory. Then the warm-process
restart path on CUDA: `ftdiff train` with the warm process, a worker killed with SIGKILL, the
job resumed — and the warm process must never hold a CUDA context (it forks the workers).

Weights are random (nothing is downloaded); the shapes are the real ones. Prints one JSON
line. ``--smoke``: tiny sizes, fp32, no compile, on CPU — checks this script where no GPU is.

Usage: python bench/gpu_models.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def frozen_parts(folder: Path, smoke: bool) -> tuple[str, str]:
    """An AutoencoderKL of Stable Diffusion's shape (8x, 4 channels) and a CLIP text encoder of
    CLIP-L's width, random weights, with the tests' tiny tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.helpers import tiny_text_encoder, tiny_vae

    if smoke:
        return str(tiny_vae(folder / "vae")), str(tiny_text_encoder(folder / "clip"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                  sample_size=256, scaling_factor=0.18215).save_pretrained(str(folder / "vae"))
    clip = tiny_text_encoder(folder / "clip")  # its tokenizer (16 tokens); a CLIP-L-wide encoder over it
    vocab = CLIPTextModel.from_pretrained(str(clip / "text_encoder")).config.vocab_size
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=16, pad_token_id=1, bos_token_id=0,
                                 eos_token_id=1)).save_pretrained(str(clip / "text_encoder"))
    return str(folder / "vae"), str(clip)


def train_check(name: str, settings: list[str], folder: Path, smoke: bool) -> dict[str, object]:
    from service.config import load_config
    from service.data.stream import build_loader
    from service.dist import DistInfo
    from service.train.loop import Trainer

    device = torch.device("cpu" if smoke else "cuda:0")
    batch, steps, warmup = (4, 4, 1) if smoke else (32, 40, 10)
    speed = [] if smoke else ["train.compile=true", 'train.precision="bf16"']
    cfg = load_config(None, [*settings, *speed, f"train.global_batch_size={batch}", f"train.max_steps={steps}",
                             f'checkpoint.url="{folder / name}"', "checkpoint.every_steps=100000",
                             "checkpoint.memory_tier=false", "logging.sample_every=0", "data.num_workers=0"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, device, "0"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = 0.0
    try:
        for i, data in enumerate(build_loader(trainer.samples, 0, steps, batch, 0, 1, 0)):
            start = time.perf_counter()
            trainer._train_step(data)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i == 0:
                first = time.perf_counter() - start
            if i == warmup:
                t0 = time.perf_counter()
        rate = (steps - warmup - 1) * batch / (time.perf_counter() - t0)
    finally:
        trainer.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"first_step_s": round(first, 2), "samples_per_s": round(rate, 1), "peak_gpu_memory_gb": round(peak, 2)}


def warm_restart_check(folder: Path, smoke: bool) -> dict[str, object]:
    """`ftdiff train` (warm process on) with one CUDA worker, SIGKILLed at step 6: the run
    must end at its last step, and the warm process must hold no CUDA context meanwhile."""
    from tests.helpers import base_env, finish, traced_run, wait_for_step, worker_pids

    dirs = traced_run(folder / "restart")
    preset = "tiny" if smoke else "base"
    cmd = [sys.executable, "-m", "service.cli", "train", "--nproc-per-node", "1",
           *[arg for kv in (f'model.preset="{preset}"', "train.max_steps=20", "checkpoint.every_steps=5",
                            "train.step_sleep_s=0.3", "train.global_batch_size=8", dirs.url_arg,
                            "supervisor.port=0", "metrics.port=0", "logging.sample_every=0")
             for arg in ("--set", kv)]]
    proc = subprocess.Popen(cmd, env=base_env(dirs.env), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(dirs.trace, 6, proc, timeout=300)
    holders = _cuda_pids() if not smoke else set()  # while the worker trains: who holds a CUDA context
    os.kill(worker_pids(dirs.trace)[0], signal.SIGKILL)
    code, err = finish(proc, timeout=300)
    warm = next((int(line.split("warm process pid ")[1].split()[0]) for line in err.splitlines()
                 if "warm process pid " in line), None)
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    latest = Catalog(open_storage(str(dirs.url))).latest()
    return {"restart_exit_code": code, "restart_last_commit": latest[0] if latest else None,
            "warm_process_pid": warm, "warm_process_holds_cuda": bool(warm and warm in holders),
            "cuda_context_pids": sorted(holders)}


def _cuda_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return {int(line) for line in out.split() if line.strip().isdigit()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check the script itself")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    result: dict[str, object] = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
                                 "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        vae, clip = frozen_parts(folder, args.smoke)
        side = 8 if args.smoke else 32
        models = {
            "dit_B2_latent_class": ['model.family="dit"', f'model.preset="{"tiny" if args.smoke else "B/2"}"',
                                    'model.conditioning="class"', "model.num_classes=3", f"model.sample_size={side}",
                                    f'model.vae="{vae}"'],
            "unet_cond_small_latent_text": ['model.family="unet-cond"', f'model.preset="{"tiny" if args.smoke else "small"}"',
                                            'model.conditioning="text"', f'model.text_encoder="{clip}"',
                                            f"model.sample_size={side}", f'model.vae="{vae}"'],
        }
        for name, settings in models.items():
            result[name] = train_check(name, settings, folder, args.smoke)
        result["warm_restart"] = warm_restart_check(folder, args.smoke)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
