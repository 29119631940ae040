"""Data loading benchmark: images/s delivered per rank, folder vs webdataset, local disk vs S3,
0 and 2 loader workers, all in one run; and whether the loader keeps ahead of a training step.

Generates ``--images`` PNGs (``--side`` px, noisy so that decoding costs what it does for real
photos), writes them as a folder and as shards (``ftdiff data pack``) on local disk and under
``--target`` (s3://bucket/prefix; endpoint and keys from the usual AWS variables), then reads
``--batches`` batches of ``--batch`` samples through the real sample stream (decode, resize,
flip, noise) of rank 0 of 1, each configuration with an empty shard cache. The model step it
is compared with is one forward/backward of ``--preset`` (default base) at the same batch.

The last line is one JSON object: ``images_per_s`` per configuration, ``step_images_per_s``,
``keeps_ahead`` per configuration (loader faster than the step: the data wait would be ~0), and
``ratios``: webdataset_vs_folder_s3, webdataset_s3_vs_local (goals: >= 10 and >= 0.8).

Usage: python bench/data.py [--target s3://bucket/prefix] [--images 2048] [--batches 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(folder: Path, count: int, side: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(count):
        sub = folder / f"class{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"{i:05d}.png")
        (sub / f"{i:05d}.txt").write_text(f"picture {i}")


def upload(local: Path, url: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # never collected in a loader worker
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(local)}", path.read_bytes())


def images_per_s(kind: str, url: str, workers: int, batch: int, batches: int, preset: str, cache: Path) -> float:
    from service.config import load_config
    from service.data.stream import TrainingSamples, build_loader, build_source

    cfg = load_config(None, [f'data.kind="{kind}"', f'data.url="{url}"', f"data.num_workers={workers}",
                             f'data.cache_dir="{cache}"', f'model.preset="{preset}"', 'data.resize="resize"'])
    source = build_source(cfg)
    samples = TrainingSamples(source, cfg.run.seed, 1000, True)
    loader = build_loader(samples, 0, batches + 1, batch, 0, 1, workers)
    it = iter(loader)
    next(it)  # worker start-up and the first shard: not the steady state
    start = time.perf_counter()
    count = sum(len(b["position"]) for b in it)
    return count / (time.perf_counter() - start)


def step_images_per_s(preset: str, batch: int) -> float:
    """One forward/backward/AdamW step of the preset on this machine (3 timed after 1)."""
    from service.config import load_config
    from service.models.build import build_model, forward, sample_size

    cfg = load_config(None, [f'model.preset="{preset}"'])
    model = build_model(cfg.model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = sample_size(cfg.model)
    x, t = torch.randn(batch, 3, side, side), torch.randint(0, 1000, (batch,))
    for i in range(4):
        if i == 1:
            start = time.perf_counter()
        forward(cfg.model, model, x, t).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return 3 * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="s3://bucket/prefix for the S3 configurations (else local only)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--side", type=int, default=96, help="side of the generated PNGs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--preset", default="base", help="the unet preset whose step the loader must keep ahead of")
    p.add_argument("--shard-size", default="4MB")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from service.data.pack import pack_folder, parse_size

    result: dict[str, object] = {"images": args.images, "side": args.side, "batch": args.batch,
                                 "batches": args.batches, "preset": args.preset, "cpus": os.cpu_count()}
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_images(root / "folder", args.images, args.side)
        pack_folder(str(root / "folder"), str(root / "shards"), parse_size(args.shard_size))
        places = {"local": (str(root / "folder"), str(root / "shards"))}
        if args.target:
            prefix = f"{args.target.rstrip('/')}/bench-data-{uuid.uuid4().hex[:8]}"
            upload(root / "folder", f"{prefix}/folder")
            upload(root / "shards", f"{prefix}/shards")
            places["s3"] = (f"{prefix}/folder", f"{prefix}/shards")
        for where, (folder_url, shards_url) in places.items():
            for kind, url in (("folder", folder_url), ("webdataset", shards_url)):
                for workers in (0, 2):
                    cache = root / f"cache-{uuid.uuid4().hex[:8]}"  # empty: the shards are read
                    rates[f"{kind}_{where}_w{workers}"] = round(
                        images_per_s(kind, url, workers, args.batch, args.batches, args.preset, cache), 1)
    step = step_images_per_s(args.preset, args.batch)
    result.update(images_per_s=rates, step_images_per_s=round(step, 1),
                  keeps_ahead={name: rate >= step for name, rate in rates.items()})
    ratios = {}
    if "webdataset_s3_w2" in rates:
        ratios["webdataset_vs_folder_s3"] = round(rates["webdataset_s3_w2"] / rates["folder_s3_w2"], 2)
        ratios["webdataset_s3_vs_local"] = round(rates["webdataset_s3_w2"] / rates["webdataset_local_w2"], 2)
        ratios["webdataset_vs_folder_s3_no_workers"] = round(rates["webdataset_s3_w0"] / rates["folder_s3_w0"], 2)
    ratios["webdataset_vs_folder_local"] = round(rates["webdataset_local_w2"] / rates["folder_local_w2"], 2)
    result["ratios"] = ratios
    print(json.dumps(result))


if __name__ == "__main__":
    main()
