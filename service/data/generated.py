"""Generated data: procedurally drawn shapes, a pure function of (seed, index) — no files, the
same images on every machine. ``shapes`` is the default job's data set."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from service.data.stream import derive_seed
from service.models.build import IMAGE_CHANNELS

if TYPE_CHECKING:
    from service.config import Config


class SyntheticSource:
    """Procedurally drawn shapes: colour, kind, position and size follow from the index.

    Infinite in principle; ``epoch_size`` fixes how many distinct images make an epoch. The
    images are simple enough that a tiny UNet visibly learns them within a few hundred steps.
    """

    PALETTE = torch.tensor(
        [[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.4, 0.9], [0.95, 0.85, 0.2], [0.8, 0.3, 0.8]]
    )
    COLOURS = ("red", "green", "blue", "yellow", "purple")
    """The PALETTE's names, for captions."""

    def __init__(self, size: int, epoch_size: int, seed: int):
        self.size, self.epoch_size, self.seed = size, epoch_size, seed
        axis = torch.linspace(-1.0, 1.0, size)
        self.yy, self.xx = torch.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.epoch_size

    CLASSES = ("circle", "square", "diamond")
    """The label of an image is the kind of its shape."""

    def describe(self) -> str:
        return f"generated, {self.epoch_size} samples per epoch"

    @property
    def num_classes(self) -> int:
        return len(self.CLASSES)

    def label(self, index: int) -> int:
        return self._kind_and_colour(index)[0]

    def caption(self, index: int) -> str:
        """What the image shows, e.g. "a red circle" (text-conditional training)."""
        kind, colour = self._kind_and_colour(index)
        return f"a {self.COLOURS[colour]} {self.CLASSES[kind]}"

    def _kind_and_colour(self, index: int) -> tuple[int, int]:
        """As image() computes them (float32 tensor arithmetic)."""
        u = self._draw(index)
        return int(u[0] * 3), int(u[1] * len(self.PALETTE))

    def _draw(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("synthetic", self.seed, index))
        return torch.rand(8, generator=g)

    def image(self, index: int) -> torch.Tensor:
        u = self._draw(index)
        kind = int(u[0] * 3)
        colour = self.PALETTE[int(u[1] * len(self.PALETTE))]
        background = 0.15 + 0.2 * u[2]
        cx, cy = (u[3] - 0.5) * 0.9, (u[4] - 0.5) * 0.9
        radius = 0.25 + 0.3 * u[5]
        dx, dy = self.xx - cx, self.yy - cy
        if kind == 0:
            mask = dx**2 + dy**2 <= radius**2
        elif kind == 1:
            mask = (dx.abs() <= radius) & (dy.abs() <= radius)
        else:
            mask = dx.abs() + dy.abs() <= radius * 1.3
        img = torch.full((IMAGE_CHANNELS, self.size, self.size), float(background))
        img[:, mask] = colour[:, None]
        return img * 2.0 - 1.0


class ShapesSource(SyntheticSource):
    """The default data: one large circle, square or triangle in one of four colours on a flat
    dark grey. Easy enough that the tiny UNet draws recognisable shapes after a minute of CPU
    training (``synthetic`` is the harder original: small shapes, five colours, varied grey)."""

    PALETTE = torch.tensor([[0.9, 0.15, 0.15], [0.15, 0.75, 0.25], [0.2, 0.35, 0.95], [0.95, 0.85, 0.15]])
    COLOURS = ("red", "green", "blue", "yellow")

    CLASSES = ("circle", "square", "triangle")

    def _draw(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("shapes", self.seed, index))
        return torch.rand(5, generator=g)

    def _kind_and_colour(self, index: int) -> tuple[int, int]:
        """As image() computes them (Python floats)."""
        kind, colour = self._draw(index).tolist()[:2]
        return int(kind * 3), int(colour * len(self.PALETTE))

    def image(self, index: int) -> torch.Tensor:
        kind, colour, r, x, y = self._draw(index).tolist()
        r = 0.45 + 0.3 * r  # in [-1, 1] units: a radius of 3.4 to 5.6 pixels at 16x16
        dx, dy = self.xx - (2 * x - 1) * (0.9 - r), self.yy - (2 * y - 1) * (0.9 - r)
        masks = (dx**2 + dy**2 <= r**2, torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,
                 (dy <= 0.75 * r) & (dx.abs() <= (dy + r) * 0.62))
        img = torch.full((IMAGE_CHANNELS, self.size, self.size), 0.2)
        img[:, masks[int(kind * 3)]] = self.PALETTE[int(colour * len(self.PALETTE))][:, None]
        return img * 2.0 - 1.0


def build_shapes(cfg: Config, size: int) -> ShapesSource:
    return ShapesSource(size, cfg.data.epoch_size, cfg.run.seed)


def build_synthetic(cfg: Config, size: int) -> SyntheticSource:
    return SyntheticSource(size, cfg.data.epoch_size, cfg.run.seed)
