"""How much samples look like the training data rather than noise: statistics for a test and a
benchmark (docs/benchmarks.md, "Sample quality").

Every statistic is computed on three sets of images in [0, 1] — the samples, held-out real
images of the data set, and Gaussian noise passed through the same clamp as the samples — so
a number is never read alone:

- ``nn_rmse``: per image, the RMS pixel distance to the nearest of ``BANK`` real images.
- ``near``: the fraction of images whose ``nn_rmse`` is within ``tau``, the distance
  that 95% of held-out real images are within (a sample that close is a shape of the data
  set, at its place, size and colour, up to the bank's spacing).
- ``flat``: per image, the fraction of pixels within 0.1 of one of its two dominant colours
  (2-means in RGB): 1.0 for a shape on a flat background, ~0 for noise, in between for blobs
  with soft edges or grainy backgrounds.
- ``shape``: for data of one shape on a flat background: the fraction of images whose shape
  (the pixels 0.15 or more away from the image's dominant colour) overlaps the shape of one of
  ``MASKS`` real images with an IoU of at least 0.8, in a colour within 0.1 of a real one. A
  blob, a half-drawn shape, an empty tile or a wrong colour fails it; a shape with a ragged
  edge may pass. ``clean``: the same at IoU 0.9 — nearly pixel-exact at 16x16 (99% of
  held-out real images reach 0.94).

``score`` puts the samples on the line from noise (0) to real data (1) by nearest-neighbour
distance. Run as ``python -m tests.quality CHECKPOINT_URL [--n 64]`` for a checkpoint's EMA
weights, sampled by ``service.sample.generate`` as ``ftdiff sample`` does.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

BANK = 2048
MASKS = 20000


@dataclass(frozen=True)
class Stats:
    nn_rmse: float
    near: float
    flat: float
    shape: float
    clean: float

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Report:
    samples: Stats
    real: Stats
    noise: Stats
    tau: float

    @property
    def score(self) -> float:
        """0: as far from the data as noise is; 1: as close as held-out real images."""
        span = self.noise.nn_rmse - self.real.nn_rmse
        return (self.noise.nn_rmse - self.samples.nn_rmse) / span

    def as_dict(self) -> dict[str, object]:
        return {"score": round(self.score, 3), "tau": round(self.tau, 4), "samples": self.samples.rounded(),
                "real": self.real.rounded(), "noise": self.noise.rounded()}


def real_images(cfg, held: int, bank: int = BANK) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """(bank, held out): up to ``bank`` images of the configured data set and ``held`` others,
    in [0, 1]. shapes and synthetic are drawn per index (unbounded); finite sets are split."""
    from service.data.stream import build_source

    source = build_source(cfg)
    if _unbounded(cfg):
        source = type(source)(source.size, bank + held, cfg.run.seed)
    if len(source) <= held:
        raise ValueError(f"{len(source)} images: too few for {held} held out")
    split = min(bank, len(source) - held)
    images = torch.stack([(source.image(i) + 1) / 2 for i in range(split + held)])
    return images[:split], images[split:]


def nearest_rmse(images: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    a, b = images.flatten(1).double(), bank.flatten(1).double()
    return (torch.cdist(a, b).min(1).values / a.shape[1] ** 0.5).float()


def flat_fraction(images: torch.Tensor, tol: float = 0.1, iters: int = 8) -> torch.Tensor:
    n, c, h, w = images.shape
    px = images.permute(0, 2, 3, 1).reshape(n, h * w, c)
    median = px.median(1).values
    farthest = px[torch.arange(n), ((px - median[:, None]) ** 2).sum(-1).argmax(1)]
    centres = torch.stack([median, farthest], 1)
    for _ in range(iters):
        label = torch.cdist(px, centres).argmin(-1)
        for k in range(2):
            member = (label == k).float()[..., None]
            count = member.sum(1)
            centres[:, k] = torch.where(count > 0, (px * member).sum(1) / count.clamp(min=1), centres[:, k])
    return (torch.cdist(px, centres).min(-1).values <= tol).float().mean(1)


def shapes_of(images: torch.Tensor, tol: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, colour) per image: the pixels ``tol`` or more from the image's dominant colour
    (its most frequent quantised colour: the background), and their mean colour."""
    px = images.permute(0, 2, 3, 1).reshape(len(images), -1, 3)
    keys = (px * 15).round() @ torch.tensor([256.0, 16.0, 1.0])
    dominant = (keys == keys.mode(dim=1).values[:, None]).float()[..., None]
    background = (px * dominant).sum(1) / dominant.sum(1)
    mask = (px - background[:, None]).norm(dim=-1) >= tol
    colour = (px * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return mask, colour


def shape_match(images: torch.Tensor, real_masks: torch.Tensor, real_colours: torch.Tensor,
                threshold: float = 0.8) -> torch.Tensor:
    """Per image: its shape has an IoU >= ``threshold`` with a real image's, in a real colour."""
    mask, colour = shapes_of(images)
    m, r = mask.float(), real_masks.float()
    inter = m @ r.T
    iou = (inter / (m.sum(1, keepdim=True) + r.sum(1)[None] - inter).clamp(min=1)).max(1).values
    in_palette = (colour[:, None] - real_colours.unique(dim=0)[None]).norm(dim=-1).min(1).values <= 0.1 * 3**0.5
    return (iou >= threshold) & in_palette & (mask.sum(1) > 0)


def stats(images: torch.Tensor, bank: torch.Tensor, tau: float, masks: tuple[torch.Tensor, torch.Tensor]) -> Stats:
    images = images.clamp(0, 1)
    nn = nearest_rmse(images, bank)
    return Stats(float(nn.mean()), float((nn <= tau).float().mean()), float(flat_fraction(images).mean()),
                 float(shape_match(images, *masks).float().mean()),
                 float(shape_match(images, *masks, threshold=0.9).float().mean()))


def report(samples: torch.Tensor, cfg) -> Report:  # type: ignore[no-untyped-def]
    """The statistics of ``samples`` (n, 3, H, W) in [0, 1] beside real data and noise."""
    n = len(samples)
    bank, held_out = real_images(cfg, max(n, 256))
    tau = float(torch.quantile(nearest_rmse(held_out, bank), 0.95))
    masks = shapes_of(_other_draw(cfg, MASKS) if _unbounded(cfg) else bank)
    g = torch.Generator().manual_seed(1234)
    noise = (torch.randn(samples.shape, generator=g) / 2 + 0.5).clamp(0, 1)  # N(0,1) in [-1,1] units
    return Report(*(stats(x, bank, tau, masks) for x in (samples, held_out, noise)), tau=tau)


def _unbounded(cfg) -> bool:  # type: ignore[no-untyped-def]
    return cfg.data.kind in ("shapes", "synthetic")


def _other_draw(cfg, n: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``n`` images of the same distribution, none of them in the bank or held out."""
    from service.data.stream import build_source

    source = build_source(cfg)
    other = type(source)(source.size, n, cfg.run.seed + 1)
    return torch.stack([(other.image(i) + 1) / 2 for i in range(n)])


def main() -> None:
    from service.checkpoint.refs import resolve
    from service.sample import generate, model_from_state
    from service.weights import load_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="checkpoint root or root/step-N")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    args = p.parse_args()
    cfg, state = load_weights(resolve(args.url), args.weights)
    images = generate(model_from_state(cfg, state), cfg, args.n, seed=args.seed, steps=args.steps)
    print(json.dumps(report(images, cfg).as_dict()))


if __name__ == "__main__":
    main()
