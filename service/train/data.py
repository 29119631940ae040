"""Training data: image sources, the global sample order, and per-sample noise.

The order of training is one global stream of samples: epoch ``e`` is a seeded permutation of the
source, and stream position ``p`` is sample ``p % N`` of epoch ``p // N``. Step ``s`` consumes
positions ``[s*B, (s+1)*B)`` (B = global batch) and rank ``r`` of ``W`` takes the r-th slice of
``B/W``. A checkpoint stores one integer (the position), so a job resumed at any world size
continues exactly where it stopped, and because augmentation, noise and timestep are pure
functions of (seed, epoch, index), the math of a global batch does not depend on the world size
or on the number of DataLoader workers.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from service.config import Config, DataConfig, redact_text, redact_url
from service.errors import StorageError, UserError
from service.model import IMAGE_CHANNELS, sample_size

log = logging.getLogger(__name__)
_INHERITED_CLIENTS: list[Any] = []  # a forked DataLoader worker's, from its parent (FolderSource.fs)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (stable across processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ImageSource(Protocol):
    """A finite, indexable set of images as float tensors (3, H, W) in [-1, 1]."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> torch.Tensor: ...


class SyntheticSource:
    """Procedurally drawn shapes: colour, kind, position and size follow from the index.

    Infinite in principle; ``epoch_size`` fixes how many distinct images make an epoch. The
    images are simple enough that a tiny UNet visibly learns them within a few hundred steps.
    """

    PALETTE = torch.tensor(
        [[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.4, 0.9], [0.95, 0.85, 0.2], [0.8, 0.3, 0.8]]
    )

    def __init__(self, size: int, epoch_size: int, seed: int):
        self.size, self.epoch_size, self.seed = size, epoch_size, seed
        axis = torch.linspace(-1.0, 1.0, size)
        self.yy, self.xx = torch.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.epoch_size

    def image(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("synthetic", self.seed, index))
        u = torch.rand(8, generator=g)
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

    def image(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("shapes", self.seed, index))
        kind, colour, r, x, y = torch.rand(5, generator=g).tolist()
        r = 0.45 + 0.3 * r  # in [-1, 1] units: a radius of 3.4 to 5.6 pixels at 16x16
        dx, dy = self.xx - (2 * x - 1) * (0.9 - r), self.yy - (2 * y - 1) * (0.9 - r)
        masks = (dx**2 + dy**2 <= r**2, torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,
                 (dy <= 0.75 * r) & (dx.abs() <= (dy + r) * 0.62))
        img = torch.full((IMAGE_CHANNELS, self.size, self.size), 0.2)
        img[:, masks[int(kind * 3)]] = self.PALETTE[int(colour * len(self.PALETTE))][:, None]
        return img * 2.0 - 1.0


def _to_rgb(img: Any) -> Any:
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


def _to_tensor(pil_image: Any, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size``, centre-crop, scale to [-1, 1]."""
    from PIL import Image

    img = _to_rgb(pil_image)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class BadImageError(UserError):
    """A file of the image folder cannot be decoded; the message names its index and URL."""


class FolderSource:
    """PNG/JPEG files under a local path or any fsspec URL, in sorted path order.

    Each file is checked when it is read (a start-up pass over a large bucket would cost
    hours). A file that does not decode stops training with an error naming it, or, with
    ``on_bad_image="skip"``, is replaced by the next decodable file in folder order (wrapping):
    a pure function of the index and the folder, so the sample stream stays the same on
    every restart and world size. Replacements are counted in ``bad_images`` (this process)
    and flagged per sample by ``TrainingSamples`` (``"bad_image"``), which reaches the training
    process whatever the number of DataLoader workers. Read errors (network, permissions) are
    never skipped: skipping them would make the stream depend on luck.
    """

    def __init__(self, url: str, size: int, on_bad_image: str = "error",
                 storage_options: dict[str, Any] | None = None):
        self.url, self.size, self.on_bad_image = url, size, on_bad_image
        self.display_url = redact_url(url)
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._pid: int | None = None
        self.bad_images = 0
        self._bad: dict[int, str] = {}  # index -> why it does not decode (this process)
        try:
            self._fs, root = fsspec.core.url_to_fs(url, **self._fs_kwargs())
            self._pid = os.getpid()
            files = [p for p in self._fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES)]
        except (ValueError, ImportError) as e:
            raise UserError(f"data.url {self.display_url!r} is not usable: {_gist(e)}") from None
        except FileNotFoundError:
            raise UserError(f"data.url {self.display_url!r} does not exist") from None
        except Exception as e:  # denied, endpoint down, DNS: the storage, not the URL
            raise StorageError(f"data.url {self.display_url!r} cannot be read: {_gist(e)}") from None
        if not files and not self.fs.exists(root):
            raise UserError(f"data.url {self.display_url!r} does not exist")
        if not files:
            raise UserError(
                f"data.url {self.display_url!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "point it at a folder of PNG/JPEG files"
            )
        self.files = sorted(files)
        self.load(0)  # fail at start-up, not hours into the run, if the files are not images
        self.bad_images = 0  # count served samples only, not this check

    def _fs_kwargs(self) -> dict[str, Any]:
        return {**self.storage_options, "skip_instance_cache": True}

    @property
    def fs(self) -> Any:
        """This process's filesystem. DataLoader workers are forked, and s3fs (like any client
        with an event loop or connection pool) must not be used across a fork: each process
        opens its own on first use."""
        if self._fs is None or self._pid != os.getpid():
            if self._fs is not None:  # the parent's, inherited by fork: collected here, its finalizer
                _INHERITED_CLIENTS.append(self._fs)  # would close the parent's session from our loop
            self._fs = fsspec.core.url_to_fs(self.url, **self._fs_kwargs())[0]
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: reopen, never pickle a client
        return {**self.__dict__, "_fs": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.files)

    def file_url(self, index: int) -> str:
        """The URL of file ``index``, without credentials (for messages)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        path = self.files[index]
        return path if protocol in ("file", "local") else redact_url(f"{protocol}://{path}")

    def image(self, index: int) -> torch.Tensor:
        return self.load(index)[0]

    def load(self, index: int) -> tuple[torch.Tensor, bool]:
        """(image, whether it is the replacement of a file that does not decode)."""
        try:
            return self._decode(index), False
        except BadImageError:
            if self.on_bad_image != "skip":
                raise
        for offset in range(1, len(self.files)):
            candidate = (index + offset) % len(self.files)
            try:
                image = self._decode(candidate)
            except BadImageError:
                continue
            self.bad_images += 1
            return image, True
        raise BadImageError(f"data.url {self.display_url!r}: cannot decode any of its {len(self.files)} "
                            "images (data.on_bad_image = \"skip\" needs at least one that decodes)")

    def _decode(self, index: int) -> torch.Tensor:
        from PIL import Image

        if index in self._bad:
            raise BadImageError(self._bad[index])
        try:
            with self.fs.open(self.files[index], "rb") as f:
                data = f.read()
        except Exception as e:  # not a bad image: the storage failed; never skipped
            raise OSError(f"data file #{index} ({self.file_url(index)}) cannot be read: {_gist(e)}") from e
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return _to_tensor(img, self.size)
        except Exception as e:  # UnidentifiedImageError, truncated data, SyntaxError, bombs
            why = (f"data.url {self.display_url!r}: cannot decode image #{index} ({self.file_url(index)}): "
                   f"{_gist(e)}; fix or remove the file, or set data.on_bad_image = \"skip\"")
            self._bad[index] = why
            if self.on_bad_image == "skip":
                log.warning("%s — skipped: training on the next image that decodes", why.split("; fix")[0])
            raise BadImageError(why) from None


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {lines[0][:200] if lines else ''}")


class DigitsSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled to RGB."""

    def __init__(self, size: int):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError(
                "data.kind = 'digits' needs scikit-learn: pip install 'ftdiff[digits]'"
            ) from None
        images = torch.from_numpy(load_digits().images).float() / 16.0  # (N, 8, 8) in [0, 1]
        images = torch.nn.functional.interpolate(images[:, None], size=(size, size), mode="bilinear")
        self.images = (images.expand(-1, IMAGE_CHANNELS, -1, -1) * 2.0 - 1.0).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]


def build_source(cfg: Config) -> ImageSource:
    size = sample_size(cfg.model)
    data: DataConfig = cfg.data
    if data.kind in ("shapes", "synthetic"):
        kind = ShapesSource if data.kind == "shapes" else SyntheticSource
        return kind(size, data.epoch_size, cfg.run.seed)
    if data.kind == "folder":
        assert data.url is not None  # guaranteed by config validation
        return FolderSource(data.url, size, on_bad_image=data.on_bad_image)
    return DigitsSource(size)


class GlobalOrder:
    """Maps a global stream position to (epoch, index in epoch, source index)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed

    @functools.lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def locate(self, position: int) -> tuple[int, int, int]:
        epoch, index = divmod(position, self.num_samples)
        return epoch, index, int(self.permutation(epoch)[index])


class TrainingSamples(Dataset):
    """Indexed by global stream position: the augmented image, its noise and its timestep."""

    def __init__(self, source: ImageSource, seed: int, num_timesteps: int, hflip: bool):
        self.source, self.seed = source, seed
        self.num_timesteps, self.hflip = num_timesteps, hflip
        self.order = GlobalOrder(len(source), seed)

    def __len__(self) -> int:  # positions are unbounded; the sampler decides which exist
        return 2**62

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        epoch, index, source_index = self.order.locate(position)
        load = getattr(self.source, "load", None)  # sources that can replace a bad file
        image, replaced = load(source_index) if load is not None else (self.source.image(source_index), False)
        g = torch.Generator().manual_seed(derive_seed("sample", self.seed, epoch, index))
        flip = bool(torch.rand(1, generator=g) < 0.5) and self.hflip
        timestep = torch.randint(0, self.num_timesteps, (), generator=g)
        noise = torch.randn(image.shape, generator=g)
        if flip:
            image = image.flip(-1)
        return {
            "image": image,
            "noise": noise,
            "timestep": timestep,
            "position": torch.tensor(position),
            "source_index": torch.tensor(source_index),
            "bad_image": torch.tensor(replaced),  # sum per batch -> ftdiff_data_bad_images_total
        }


def rank_positions(start: int, global_batch: int, rank: int, world_size: int) -> list[int]:
    """The positions ``rank`` trains on in the global batch that begins at ``start``."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} not divisible by world size {world_size}")
    local = global_batch // world_size
    first = start + rank * local
    return list(range(first, first + local))


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of ``num_steps`` global batches from ``start_position`` on."""

    def __init__(self, start_position: int, num_steps: int, global_batch: int, rank: int, world: int):
        self.start_position, self.num_steps = start_position, num_steps
        self.global_batch, self.rank, self.world = global_batch, rank, world

    def __len__(self) -> int:
        return max(0, self.num_steps)

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.num_steps):
            start = self.start_position + k * self.global_batch
            yield rank_positions(start, self.global_batch, self.rank, self.world)


def check_batch_geometry(global_batch: int, world_size: int) -> None:
    if global_batch % world_size:
        raise UserError(
            f"train.global_batch_size = {global_batch} is not divisible by the world size "
            f"{world_size}; choose a multiple of {world_size} (e.g. "
            f"{max(world_size, global_batch - global_batch % world_size)})"
        )


def build_loader(
    samples: TrainingSamples,
    start_position: int,
    num_steps: int,
    global_batch: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> DataLoader:
    """A loader over this rank's slices of the global stream, from ``start_position`` on."""
    sampler = RankBatchSampler(start_position, num_steps, global_batch, rank, world_size)
    return DataLoader(
        samples,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
    )
