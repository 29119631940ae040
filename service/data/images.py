"""Sample bytes to what the sources yield: images as tensors (any PNG/JPEG/WebP mode as 8-bit
RGB, brought to the model's input as ``data.resize`` says, scaled to [-1, 1]) and captions as
text."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from service.errors import UserError


class BadImageError(UserError):
    """A sample of the data cannot be decoded (or its shard read as indexed); the message names
    it. Skipped deterministically with ``data.on_bad_image = "skip"``, else exit 2."""


class ImageSizeError(UserError):
    """An image is not of the model's input size and ``data.resize`` does not allow bringing it
    there: a setting to choose, not a damaged sample, so never skipped (exit 2). The message
    says what the image is; the source prefixes which image."""


# data.resize: how an image of another size than the model's input becomes one.
RESIZE_MODES = ("refuse", "resize", "center-crop")


def decode_caption(data: bytes) -> str:
    """A caption file's text: UTF-8 (a byte-order mark dropped) or UTF-16 with its byte-order
    mark (what Windows editors write); bytes that are neither become U+FFFD. Trimmed."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace").strip()
    return data.decode("utf-8-sig", errors="replace").strip()


def decode_image(data: bytes, size: int, resize: str = "resize") -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) in [-1, 1]; raises whatever Pillow raises for
    bytes that are not an image, and ImageSizeError (the caller names the file)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_tensor(img, size, resize)


def to_rgb(img: Any) -> Any:
    """Any PNG/JPEG mode as 8-bit RGB, without the surprises of ``convert("RGB")``.

    16-bit grey ("I;16", "I") keeps its top 8 bits (>> 8): convert() would clip every value
    above 255 to white. Transparency (RGBA, LA, PA, palette or colour-key tRNS) is composited
    on white — the usual background of cut-out images — instead of being dropped, which would
    expose whatever colour the transparent pixels happen to store.
    """
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def to_tensor(pil_image: Any, size: int, resize: str = "resize") -> torch.Tensor:
    """The image as (3, size, size) in [-1, 1]. ``resize`` (data.resize): "resize" scales the
    shorter side to ``size`` and centre-crops the longer one; "center-crop" cuts the central
    ``size`` x ``size`` without scaling (the image must be at least that large); "refuse" takes
    only images of exactly that size."""
    from PIL import Image

    img = to_rgb(pil_image)
    w, h = img.size
    if (w, h) != (size, size):
        if resize == "refuse":
            raise ImageSizeError(
                f"is {w}x{h} pixels, and the model's input is {size}x{size} (data.resize = \"refuse\"): set "
                f"data.resize = \"resize\" (shorter side scaled to {size}, centre-cropped) or \"center-crop\" "
                f"(the central {size}x{size}, not scaled), or make model.sample_size match the images")
        if resize == "center-crop" and min(w, h) < size:
            raise ImageSizeError(
                f"is {w}x{h} pixels, smaller than the {size}x{size} that data.resize = \"center-crop\" cuts "
                f"out of it: set data.resize = \"resize\" to scale images up, or remove the small ones")
        if resize == "resize":
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
