"""scikit-learn's bundled 8x8 handwritten digits (the ``digits`` extra): real images that need
no download."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from service.errors import UserError
from service.models.build import IMAGE_CHANNELS

if TYPE_CHECKING:
    from service.config import Config


class DigitsSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled to RGB."""

    def __init__(self, size: int):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError(
                "data.kind = 'digits' needs scikit-learn: pip install 'ftdiff[digits]'"
            ) from None
        digits = load_digits()
        self.labels = [int(t) for t in digits.target]
        images = torch.from_numpy(digits.images).float() / 16.0  # (N, 8, 8) in [0, 1]
        images = torch.nn.functional.interpolate(images[:, None], size=(size, size), mode="bilinear")
        self.images = (images.expand(-1, IMAGE_CHANNELS, -1, -1) * 2.0 - 1.0).contiguous()

    def describe(self) -> str:
        return f"{len(self)} images (scikit-learn)"

    num_classes = 10

    def label(self, index: int) -> int:
        return self.labels[index]

    NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

    def caption(self, index: int) -> str:
        return f"a handwritten {self.NAMES[self.labels[index]]}"

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]


def build(cfg: Config, size: int) -> DigitsSource:
    return DigitsSource(size)
