"""A sharded data set (``data.kind = "webdataset"``): tar shards in the WebDataset layout
(members grouped by key: ``KEY.png|jpg|jpeg|webp``, optionally ``KEY.cls`` and ``KEY.txt`` or a
``KEY.json`` with a "caption"/"text" field) under a local path or any fsspec URL, with the
``index.json`` that ``ftdiff data pack`` / ``ftdiff data index`` write.

No rank lists the prefix or opens every shard at start: the index says what there is. Shards
are read whole through this node's cache (service/data/shard_cache.py) in the order of
service/data/shard_order.py, fetched ahead of the training position.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
import torch

from service.data.images import BadImageError, ImageSizeError, decode_caption, decode_image
from service.data.shard_cache import BadShardError, ShardCache
from service.data.shard_index import INDEX_NAME, ShardIndex
from service.data.shard_order import ShardedOrder, shard_of, shard_starts
from service.errors import StorageError, UserError
from service.redact import redact_text, redact_url

if TYPE_CHECKING:
    from service.config import Config

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_INDEX_CLIENTS: list[Any] = []  # see read_index
# Shards kept open per process (a window spans a few).
_OPEN_SHARDS = 4


@dataclass(frozen=True)
class Sample:
    key: str
    image_offset: int
    image_size: int
    label: int | None
    caption: str
    source: str = ""
    """The file it was packed from (the ``.json``'s "source"), for messages."""


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name, the
    extension the rest (lower case)."""
    folder, _, name = member.rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(f: BinaryIO, where: str) -> list[Sample]:
    """The samples of a tar shard in member order (reads the headers and the small members)."""
    groups: dict[str, dict[str, Any]] = collections.OrderedDict()
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                group = groups.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    group["image"] = (member.offset_data, member.size)
                elif ext in ("cls", "txt", "json"):
                    data = tar.extractfile(member)
                    group[ext] = decode_caption(data.read()) if data else ""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadShardError(f"data shard {where} is not a readable tar ({type(e).__name__}: {e}); restore or "
                            "re-pack it, or set data.on_bad_image = \"skip\"") from None
    samples = []
    for key, group in groups.items():
        if "image" not in group:
            continue  # metadata without an image: not a sample (as webdataset's decoders skip it)
        samples.append(Sample(key, *group["image"], label=_label(group.get("cls"), where, key),
                              caption=_caption(group), source=_meta(group).get("source", "")))
    return samples


def _label(text: str | None, where: str, key: str) -> int | None:
    if text is None:
        return None
    try:
        label = int(text.strip())
    except ValueError:
        label = -1
    if label < 0:
        raise BadShardError(f"data shard {where}: {key}.cls is {text.strip()[:20]!r}, not a class id (0, 1, ...); "
                            "fix the shard (and index it again), or set data.on_bad_image = \"skip\"")
    return label


def _meta(group: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(group.get("json") or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _caption(group: dict[str, Any]) -> str:
    if "txt" in group:
        return str(group["txt"]).strip()
    meta = _meta(group)
    return str(meta.get("caption") or meta.get("text") or "").strip()


def read_index(url: str, storage_options: dict[str, Any] | None = None, what: str = "data.url") -> ShardIndex:
    shown = redact_url(url.rstrip("/"))
    try:
        # Kept for good: an s3fs client sits in reference cycles, and were it collected in a
        # forked loader worker, it would close this process's session from the wrong loop.
        fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(storage_options or {}))
        _INDEX_CLIENTS.append(fs)
        text = fs.cat_file(f"{root.rstrip('/')}/{INDEX_NAME}").decode()
    except FileNotFoundError:
        raise UserError(f"{what} {shown!r} has no {INDEX_NAME}: pack a folder with `ftdiff data pack SRC "
                        f"{shown}`, or index existing shards with `ftdiff data index {shown}`") from None
    except (ValueError, ImportError) as e:
        raise UserError(f"{what} {shown!r} is not usable: {_gist(e)}") from None
    except Exception as e:  # denied, endpoint down: the storage's
        raise StorageError(f"{what} {shown!r} cannot be read: {_gist(e)}") from None
    return ShardIndex.from_json(text, f"{shown}/{INDEX_NAME}")


class WebDatasetSource:
    def __init__(self, url: str, size: int, index: ShardIndex, cache: ShardCache, window: int,
                 on_bad_image: str = "error", resize: str = "refuse"):
        self.url, self.display_url, self.size, self.resize = url, redact_url(url), size, resize
        self.index, self.cache, self.window, self.on_bad_image = index, cache, window, on_bad_image
        self.shards = index.shards
        self._starts = shard_starts([s.samples for s in self.shards])
        self._order: ShardedOrder | None = None
        self._scans: dict[int, list[Sample]] = {}
        self._files: collections.OrderedDict[int, BinaryIO] = collections.OrderedDict()
        self._files_pid = os.getpid()
        self._bad_shards: dict[int, str] = {}
        self._warned: set[str] = set()
        self._window_seen = -1
        self.bad_images = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": collections.OrderedDict(), "_files_pid": None}

    def __len__(self) -> int:
        return self.index.num_samples

    def describe(self) -> str:
        return (f"{len(self)} samples in {len(self.shards)} shards under {self.display_url} "
                f"(index {self.index.digest()})")

    def identity(self) -> dict[str, Any]:
        """What the run's fingerprint records of the data: its index's digest."""
        return {"data.index": self.index.digest()}

    @property
    def bytes_read(self) -> int:
        return self.cache.bytes_read

    # -- order --------------------------------------------------------------------------------
    def order(self, seed: int) -> ShardedOrder:
        """The global order of this data set (service/data/shard_order.py)."""
        self._order = ShardedOrder([s.samples for s in self.shards], seed, self.window)
        return self._order

    def read_ahead(self, position: int) -> None:
        """Fetch the shards of the next two windows in the background, once per window."""
        order = self._order
        if order is None:
            return
        window = position // order.window
        if window == self._window_seen:
            return
        self._window_seen = window
        self.cache.prefetch([self.shards[s] for s in order.shards_ahead(position, 2 * order.window)])

    # -- labels and captions ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self.index.classes:
            return len(self.index.classes)
        seen = [int(k) for s in self.shards for k in s.labels]
        return max(seen) + 1 if seen else 0

    @property
    def num_captioned(self) -> int:
        return self.index.num_captioned

    @property
    def num_unlabelled(self) -> int:
        """Samples without a ``.cls`` (a class-conditional run refuses to start with any)."""
        return self.index.num_samples - self.index.num_labelled

    def label(self, index: int) -> int:
        label = self._sample(index).label
        if label is None:
            shard, _ = self._locate(index)
            raise UserError(f"data shard {self.cache.where(self.shards[shard])}: {self._sample(index).key} has no "
                            ".cls; a class-conditional run needs a label for every sample")
        return label

    def caption(self, index: int) -> str:
        return self._sample(index).caption

    # -- images -------------------------------------------------------------------------------
    def image(self, index: int) -> torch.Tensor:
        return self.fetch(index)[0]

    def fetch(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, the sample it came from: ``index``, or with ``on_bad_image = "skip"`` the
        next one that decodes — the same on every run and world size)."""
        try:
            return self._decode(index), index
        except BadImageError as e:
            if self.on_bad_image != "skip":
                raise
            if isinstance(e, BadShardError) and str(e) not in self._warned:
                self._warned.add(str(e))  # once per shard and process, as a file is once per read
                log.warning("%s — skipped: training on the next samples that decode", str(e).split("; ")[0])
        candidate, n = index, len(self)
        for _ in range(n):
            shard, _member = self._locate(candidate)
            if shard in self._bad_shards:  # the whole shard is unusable: on to the next one's first
                candidate = (self._starts[shard] + self.shards[shard].samples) % n
            else:
                candidate = (candidate + 1) % n
            if candidate == index:
                break
            try:
                image = self._decode(candidate)
            except BadImageError:
                continue
            self.bad_images += 1
            return image, candidate
        raise BadImageError(f"data.url {self.display_url!r}: no sample decodes (data.on_bad_image = \"skip\" needs "
                            "at least one)")

    def _decode(self, index: int) -> torch.Tensor:
        sample = self._sample(index)
        shard, _ = self._locate(index)
        f = self._file(shard)
        f.seek(sample.image_offset)
        data = f.read(sample.image_size)
        try:
            return decode_image(data, self.size, self.resize)
        except ImageSizeError as e:  # a setting to choose, not a damaged sample: never skipped
            raise ImageSizeError(f"data shard {self.cache.where(self.shards[shard])}: {sample.key} {e}") from None
        except Exception as e:
            packed_from = f" (packed from {sample.source})" if sample.source else ""
            gist = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", _gist(e))
            why = (f"data shard {self.cache.where(self.shards[shard])}: cannot decode {sample.key}{packed_from} "
                   f"({gist}); fix the shard, or set data.on_bad_image = \"skip\"")
            if self.on_bad_image == "skip":
                log.warning("%s — skipped: training on the next sample that decodes", why.split("; fix")[0])
            raise BadImageError(why) from None

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within it) of sample id ``index``."""
        return shard_of(self._starts, index)

    def _sample(self, index: int) -> Sample:
        shard, member = self._locate(index)
        return self._scan(shard)[member]

    def _scan(self, shard: int) -> list[Sample]:
        if shard in self._bad_shards:
            raise BadShardError(self._bad_shards[shard])
        scanned = self._scans.get(shard)
        if scanned is None:
            entry = self.shards[shard]
            try:
                f = self._file(shard)
                f.seek(0)
                scanned = scan_shard(f, self.cache.where(entry))
                if len(scanned) != entry.samples:
                    raise BadShardError(f"data shard {self.cache.where(entry)} holds {len(scanned)} samples, the "
                                        f"index says {entry.samples}; rebuild the index (`ftdiff data index`)")
            except BadShardError as e:
                self._bad_shards[shard] = str(e)
                raise
            self._scans[shard] = scanned
        return scanned

    def _file(self, shard: int) -> BinaryIO:
        if self._files_pid != os.getpid():  # a forked worker: the parent's handles share offsets
            self._files, self._files_pid = collections.OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            try:
                f = self.cache.open(self.shards[shard])  # kept open: closed when it leaves the LRU
            except BadShardError as e:
                self._bad_shards[shard] = str(e)
                raise
            self._files[shard] = f
            while len(self._files) > _OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return f


def default_cache_dir(index: ShardIndex) -> Path:
    """Per data set (its index's digest), under the temp folder: a node's ranks share it."""
    return Path(tempfile.gettempdir()) / "ftdiff-shards" / index.digest()


def build(cfg: Config, size: int) -> WebDatasetSource:
    assert cfg.data.url is not None  # config validation: the kind needs_url
    index = read_index(cfg.data.url)
    cache_dir = Path(cfg.data.cache_dir) / index.digest() if cfg.data.cache_dir else default_cache_dir(index)
    cache = ShardCache(cfg.data.url, cache_dir, int(cfg.data.cache_limit_gb * 2**30), cfg.data.read_retry_s)
    return WebDatasetSource(cfg.data.url, size, index, cache, cfg.data.shuffle_window,
                            on_bad_image=cfg.data.on_bad_image, resize=cfg.data.resize)


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {lines[0][:200] if lines else ''}")
