"""``ftdiff data pack | index | inspect``: make, index and look at a sharded data set.

``pack`` turns an image folder (local or any fsspec URL; classes from first-level subfolders,
captions from ``.txt`` files beside the images) into tar shards of about a target size, in the
WebDataset layout, keeping each image's original bytes. ``index.json`` is written last, so a
pack that died half-way leaves no data set that passes for a whole one (running it again
rewrites the same shards). ``index`` builds the index of existing shards (e.g. img2dataset's)
by reading each once.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any

import fsspec

from service.data.folder import IMAGE_SUFFIXES, caption_files
from service.data.images import decode_caption
from service.data.shard_index import INDEX_NAME, ShardEntry, ShardIndex
from service.data.webdataset import scan_shard, split_key
from service.errors import StorageError, UserError
from service.redact import redact_text, redact_url

SHARD_NAME = "shard-{:06d}.tar"


def _open(url: str, what: str) -> tuple[Any, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise UserError(f"{what} {redact_url(url)!r} is not usable: {_gist(e)}") from None
    return fs, root.rstrip("/")


def _refuse_existing(fs: Any, root: str, url: str) -> None:
    if fs.exists(f"{root}/{INDEX_NAME}"):
        raise UserError(f"{redact_url(url)!r} already holds a data set ({INDEX_NAME}); choose a new location "
                        "(a run trained on it records its index, so it must not change)")


def _write_atomically(fs: Any, path: str, data: bytes) -> None:
    """Local files through a rename; an object store's PUT is atomic already."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


class _ShardWriter:
    """Collects samples into an in-memory tar and uploads it once it reaches the target size."""

    def __init__(self, fs: Any, root: str, shard_bytes: int):
        self.fs, self.root, self.shard_bytes = fs, root, shard_bytes
        self.entries: list[ShardEntry] = []
        self._start()

    def _start(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples, self.captioned = 0, 0
        self.labels: collections.Counter[str] = collections.Counter()

    def add(self, key: str, members: dict[str, bytes], label: int | None, caption: str) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # no clock in the bytes: re-packs are equal
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.captioned += bool(caption)
        if label is not None:
            self.labels[str(label)] += 1
        if self.buffer.tell() >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.samples:
            return
        self.tar.close()
        data = self.buffer.getvalue()
        name = SHARD_NAME.format(len(self.entries))
        try:
            self.fs.pipe_file(f"{self.root}/{name}", data)
        except Exception as e:
            raise StorageError(f"shard {name} cannot be written: {_gist(e)}") from None
        self.entries.append(ShardEntry(name=name, samples=self.samples, bytes=len(data),
                                       sha256=hashlib.sha256(data).hexdigest(), labels=dict(self.labels),
                                       captioned=self.captioned))
        self._start()


def pack_folder(src: str, dst: str, shard_bytes: int, on_image: Callable[[int, int], None] | None = None) -> ShardIndex:
    """Pack the images under ``src`` into shards under ``dst``; ``on_image(done, total)``."""
    sfs, sroot = _open(src, "SRC")
    dfs, droot = _open(dst, "DST")
    try:
        if not sfs.exists(sroot):
            raise FileNotFoundError(sroot)
        found = sfs.find(sroot, detail=True)
        listing = list(found)
    except FileNotFoundError:
        raise UserError(f"SRC {redact_url(src)!r} does not exist") from None
    except Exception as e:
        raise StorageError(f"SRC {redact_url(src)!r} cannot be listed: {_gist(e)}") from None
    # As kind=folder takes them: by the last suffix (a file name may hold other dots).
    images = sorted(p for p in listing if p.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise UserError(f"SRC {redact_url(src)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = caption_files([p for p in listing if found[p].get("size", 1)])  # an empty .txt: no caption
    relative = [p[len(sroot):].lstrip("/") for p in images]
    folders = [r.partition("/")[0] if "/" in r else None for r in relative]
    # Classes only when every image is in a first-level subfolder (as kind=folder takes them).
    classes = sorted({f for f in folders if f is not None}) if all(folders) else []
    class_ids = {name: i for i, name in enumerate(classes)}
    _refuse_existing(dfs, droot, dst)
    try:
        dfs.makedirs(droot, exist_ok=True)  # a local folder; nothing on an object store
    except Exception as e:
        raise StorageError(f"DST {redact_url(dst)!r} cannot be created: {_gist(e)}") from None
    writer = _ShardWriter(dfs, droot, shard_bytes)
    for i, (path, rel, folder) in enumerate(zip(images, relative, folders)):
        stem, ext = os.path.splitext(path)
        try:
            members = {ext.lower().lstrip("."): sfs.cat_file(path)}
            caption = decode_caption(sfs.cat_file(captions[stem])) if stem in captions else ""
        except Exception as e:
            raise StorageError(f"SRC file {redact_url(rel)!r} cannot be read: {_gist(e)}") from None
        label = class_ids[folder] if classes and folder is not None else None
        if label is not None:
            members["cls"] = str(label).encode()
        if caption:
            members["txt"] = caption.encode()
        members["json"] = json.dumps({"source": rel}).encode()
        writer.add(f"{i:09d}", members, label, caption)
        if on_image is not None:
            on_image(i + 1, len(images))
    writer.flush()
    index = ShardIndex(shards=tuple(writer.entries), classes=tuple(classes))
    _write_atomically(dfs, f"{droot}/{INDEX_NAME}", index.to_json().encode())
    return index


def index_shards(url: str, on_shard: Callable[[int, int], None] | None = None) -> ShardIndex:
    """Write ``index.json`` for the ``.tar`` shards under ``url`` (each is read once)."""
    fs, root = _open(url, "URL")
    try:
        names = sorted(p[len(root):].lstrip("/") for p in fs.find(root) if p.endswith(".tar"))
    except Exception as e:
        raise StorageError(f"{redact_url(url)!r} cannot be listed: {_gist(e)}") from None
    if not names:
        raise UserError(f"{redact_url(url)!r} holds no .tar shards")
    _refuse_existing(fs, root, url)
    entries = []
    for n, name in enumerate(names):
        data = fs.cat_file(f"{root}/{name}")
        samples = scan_shard(io.BytesIO(data), f"{redact_url(url)}/{name}")
        labels = collections.Counter(str(s.label) for s in samples if s.label is not None)
        entries.append(ShardEntry(name=name, samples=len(samples), bytes=len(data),
                                  sha256=hashlib.sha256(data).hexdigest(), labels=dict(labels),
                                  captioned=sum(bool(s.caption) for s in samples)))
        if on_shard is not None:
            on_shard(n + 1, len(names))
    empty = [e.name for e in entries if e.samples == 0]
    if empty:
        raise UserError(f"shards without any image: {', '.join(empty[:3])}; remove them before indexing")
    index = ShardIndex(shards=tuple(entries))
    _write_atomically(fs, f"{root}/{INDEX_NAME}", index.to_json().encode())
    return index


def inspect(url: str, keys: int = 5) -> str:
    """Counts, sizes, the label histogram and the first keys of the first shard."""
    from service.data.webdataset import read_index

    index = read_index(url, what="URL")
    fs, root = _open(url, "URL")
    total = sum(s.bytes for s in index.shards)
    histogram: collections.Counter[int] = collections.Counter()
    for s in index.shards:
        histogram.update({int(k): v for k, v in s.labels.items()})
    lines = [f"{redact_url(url)}: {index.num_samples} samples in {len(index.shards)} shards, {total / 1e6:.1f} MB "
             f"(index {index.digest()})",
             f"captioned: {index.num_captioned} of {index.num_samples}"]
    if histogram:
        names = index.classes
        lines.append("labels:")
        lines += [f"  {k} {names[k] if k < len(names) else '':<20} {histogram[k]}" for k in sorted(histogram)]
    else:
        lines.append("labels: none")
    first = index.shards[0]
    with fs.open(f"{root}/{first.name}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        seen: dict[str, list[str]] = {}
        for member in tar:  # streamed: only the first members are read
            key, ext = split_key(member.name)
            if key not in seen and len(seen) == keys:
                break
            seen.setdefault(key, []).append(ext)
    lines.append(f"first keys of {first.name}:")
    lines += [f"  {key}: {', '.join(exts)}" for key, exts in seen.items()]
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """``"256MB"``, ``"1GB"``, ``"500k"`` or bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    number = t.rstrip("kmgb")
    unit = t[len(number):] or "b"
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):
        raise UserError(f"--shard-size {text!r}: give a size such as 256MB, 1GB or a number of bytes") from None
    if value < 1:
        raise UserError(f"--shard-size {text!r}: must be positive")
    return value


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {lines[0][:200] if lines else ''}")
