"""The global sample stream: every rank's batches, augmentation, noise and timesteps.

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from service.data.registry import SOURCES
from service.data.skips import Skips
from service.errors import UserError

if TYPE_CHECKING:
    from service.config import Config


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (stable across processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ImageSource(Protocol):
    """A finite, indexable set of images as float tensors (3, H, W) in [-1, 1].

    A source may also offer ``fetch(index) -> (image, index used)`` when it can stand in another
    image for one that does not decode (see ``FolderSource``), and ``num_classes`` with
    ``label(index)`` when its images have classes (class-conditional training)."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> torch.Tensor: ...

    def describe(self) -> str:
        """What the dry run says about it, e.g. "1797 images (scikit-learn)"."""
        ...


def build_source(cfg: Config) -> ImageSource:
    """The source ``data.kind`` names, at the model's input size."""
    from service.models.build import image_size

    return SOURCES[cfg.data.kind].build_function()(cfg, image_size(cfg.model))


def data_identity(source: ImageSource) -> dict[str, Any]:
    """What the run's fingerprint records of the data beyond its settings (a sharded data
    set: its index's digest)."""
    identity = getattr(source, "identity", None)
    return identity() if identity is not None else {}


def training_labels(cfg: Config, source: ImageSource) -> Labels | None:
    """The labels a class-conditional model trains on (None for an unconditional one), after
    checking that the data has classes and that ``model.num_classes`` holds them all."""
    if cfg.model.conditioning != "class":
        return None
    from service.models.build import null_label

    classes = getattr(source, "num_classes", None)
    if not classes:
        raise UserError(f"model.conditioning = 'class' needs labelled data; data.kind = {cfg.data.kind!r} has none "
                        "(a folder needs one subfolder per class)")
    unlabelled = getattr(source, "num_unlabelled", 0)
    if unlabelled:
        raise UserError(f"model.conditioning = 'class' needs a label for every sample; {unlabelled} of "
                        f"{len(source)} in data.url have none (a shard's KEY.cls)")
    if classes > cfg.model.num_classes:
        raise UserError(f"the data has {classes} classes but model.num_classes = {cfg.model.num_classes}; "
                        f"set model.num_classes = {classes} (or more)")
    return Labels(null=null_label(cfg.model), dropout=cfg.model.cond_dropout)


def training_captions(cfg: Config, source: ImageSource) -> Captions | None:
    """How a text-conditional model gets its captions (None for other models), after checking
    that the data has some."""
    if cfg.model.conditioning != "text":
        return None
    if not hasattr(source, "caption") or getattr(source, "num_captioned", 1) == 0:
        where = " (a folder needs a .txt of the same name beside each image)" if cfg.data.kind == "folder" else ""
        raise UserError(f"model.conditioning = 'text' needs captioned data; data.kind = {cfg.data.kind!r} has "
                        f"none{where}")
    return Captions(dropout=cfg.model.cond_dropout)


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


@dataclass(frozen=True)
class Labels:
    """Class labels for a class-conditional model: ``dropout`` of the samples get ``null``
    instead (the class of "no class" that classifier-free guidance needs)."""

    null: int
    dropout: float


@dataclass(frozen=True)
class Captions:
    """Captions for a text-conditional model: ``dropout`` of the samples get the empty caption
    instead (what classifier-free guidance contrasts with)."""

    dropout: float


class TrainingSamples(Dataset):
    """Indexed by global stream position: the augmented image, its noise and its timestep (and
    its class label, with ``labels``; its caption, with ``captions``)."""

    def __init__(self, source: ImageSource, seed: int, num_timesteps: int, hflip: bool,
                 labels: Labels | None = None, noise_shape: tuple[int, ...] | None = None,
                 captions: Captions | None = None):
        """``noise_shape``: the denoiser's input when it is not the image's (a VAE's latents)."""
        self.source, self.seed = source, seed
        self.num_timesteps, self.hflip = num_timesteps, hflip
        self.labels, self.noise_shape, self.captions = labels, noise_shape, captions
        # A source that reads in bulk (shards) brings its own order; the math is the same kind.
        own_order = getattr(source, "order", None)
        self.order = own_order(seed) if own_order is not None else GlobalOrder(len(source), seed)
        self.read_ahead = getattr(source, "read_ahead", None)

    def __len__(self) -> int:  # positions are unbounded; the sampler decides which exist
        return 2**62

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | str]:
        epoch, index, source_index = self.order.locate(position)
        if self.read_ahead is not None:  # shards: fetch what the next positions need
            self.read_ahead(position)
        fetch = getattr(self.source, "fetch", None)  # sources that can replace a bad file
        image, used = fetch(source_index) if fetch is not None else (self.source.image(source_index), source_index)
        replaced = used != source_index
        g = torch.Generator().manual_seed(derive_seed("sample", self.seed, epoch, index))
        flip = bool(torch.rand(1, generator=g) < 0.5) and self.hflip
        timestep = torch.randint(0, self.num_timesteps, (), generator=g)
        noise = torch.randn(self.noise_shape or image.shape, generator=g)
        if flip:
            image = image.flip(-1)
        return {
            "image": image,
            "noise": noise,
            "timestep": timestep,
            "position": torch.tensor(position),
            "source_index": torch.tensor(source_index),
            "bad_image": torch.tensor(replaced),  # sum per batch -> ftdiff_data_bad_images_total
        } | self._label(epoch, index, used) | self._caption(epoch, index, used)

    def _label(self, epoch: int, index: int, used: int) -> dict[str, torch.Tensor]:
        if self.labels is None:
            return {}
        dropped = self._dropped("label-dropout", self.labels.dropout, epoch, index)
        return {"label": torch.tensor(self.labels.null if dropped else self.source.label(used))}

    def _caption(self, epoch: int, index: int, used: int) -> dict[str, str]:
        if self.captions is None:
            return {}
        dropped = self._dropped("caption-dropout", self.captions.dropout, epoch, index)
        return {"caption": "" if dropped else self.source.caption(used)}  # type: ignore[attr-defined]

    def _dropped(self, what: str, share: float, epoch: int, index: int) -> bool:
        # A generator of its own: the image's noise, timestep and flip stay what they were.
        g = torch.Generator().manual_seed(derive_seed(what, self.seed, epoch, index))
        return bool(torch.rand(1, generator=g) < share)


def rank_positions(start: int, global_batch: int, rank: int, world_size: int) -> list[int]:
    """The positions ``rank`` trains on in the global batch that begins at ``start``."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} not divisible by world size {world_size}")
    local = global_batch // world_size
    first = start + rank * local
    return list(range(first, first + local))


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of ``num_steps`` global batches from ``start_position`` on,
    stepping over the skipped windows of the stream (a batch begins at a window's end)."""

    def __init__(self, start_position: int, num_steps: int, global_batch: int, rank: int, world: int,
                 skips: Skips | None = None):
        self.start_position, self.num_steps = start_position, num_steps
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.skips = skips or Skips()

    def __len__(self) -> int:
        return max(0, self.num_steps)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.skips.next_start(self.start_position, self.global_batch)
        for _ in range(self.num_steps):
            yield rank_positions(start, self.global_batch, self.rank, self.world)
            start = self.skips.next_start(start + self.global_batch, self.global_batch)


def check_batch_geometry(global_batch: int, world_size: int, accum_steps: int = 1) -> None:
    pieces = world_size * accum_steps
    if global_batch % pieces:
        of = f"the world size {world_size}" if accum_steps == 1 else (
            f"world size x train.grad_accum_steps = {world_size} x {accum_steps} = {pieces}")
        raise UserError(
            f"train.global_batch_size = {global_batch} is not divisible by {of}; choose a multiple of "
            f"{pieces} (e.g. {max(pieces, global_batch - global_batch % pieces)})"
        )


def build_loader(
    samples: TrainingSamples,
    start_position: int,
    num_steps: int,
    global_batch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    skips: Skips | None = None,
) -> DataLoader:
    """A loader over this rank's slices of the global stream, from ``start_position`` on."""
    sampler = RankBatchSampler(start_position, num_steps, global_batch, rank, world_size, skips)
    return DataLoader(
        samples,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """A loader worker ignores SIGTERM/SIGINT. torchrun (and a terminal's Ctrl-C) signals the
    whole process group: a worker that died of it would make the trainer's next batch raise
    ("DataLoader worker ... killed by signal") before the emergency commit of a preemption.
    The trainer stops its workers itself; a worker whose trainer is gone exits on its own."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
