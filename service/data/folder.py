"""An image folder: PNG/JPEG files under a local path or any fsspec URL (``data.kind = "folder"``)."""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import fsspec
import torch

from service.data.images import BadImageError, ImageSizeError, decode_caption, decode_image
from service.errors import StorageError, UserError
from service.redact import redact_text, redact_url

if TYPE_CHECKING:
    from service.config import Config

log = logging.getLogger(__name__)
_INHERITED_CLIENTS: list[Any] = []  # a forked DataLoader worker's, from its parent (FolderSource.fs)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"


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
                 storage_options: dict[str, Any] | None = None, resize: str = "refuse"):
        self.url, self.size, self.on_bad_image, self.resize = url, size, on_bad_image, resize
        self.display_url = redact_url(url)
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._pid: int | None = None
        self.bad_images = 0
        self._bad: dict[int, str] = {}  # index -> why it does not decode (this process)
        try:
            self._fs, root = fsspec.core.url_to_fs(url, **self._fs_kwargs())
            self._root = root.rstrip("/")
            self._pid = os.getpid()
            found = self._fs.find(root, detail=True)
            listing = list(found)
            files = [p for p in listing if p.lower().endswith(IMAGE_SUFFIXES)]
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
        # The captions of text-conditional training: a .txt beside an image (same name).
        self._captioned = caption_files([p for p in listing if found[p].get("size", 1)])  # empty: no caption
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

    def describe(self) -> str:
        return f"{len(self)} images under {self.display_url}"

    @functools.cached_property
    def classes(self) -> list[str]:
        """The class names: the first-level subfolders, sorted (a file of the root itself has
        none, which a class-conditional run refuses)."""
        return sorted({self._subfolder(path) for path in self.files} - {None})  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label(self, index: int) -> int:
        folder = self._subfolder(self.files[index])
        if folder is None:
            raise UserError(f"data.url {self.display_url!r}: {self.file_url(index)} is not in a subfolder; a "
                            "class-conditional run takes each image's class from its first-level subfolder")
        return self._class_ids[folder]

    @functools.cached_property
    def _class_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def _subfolder(self, path: str) -> str | None:
        relative = path[len(self._root):].lstrip("/") if path.startswith(self._root) else path
        first, sep, _ = relative.partition("/")
        return first if sep else None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_captioned(self) -> int:
        """How many images have a caption (a .txt of the same name beside them)."""
        return sum(os.path.splitext(path)[0] in self._captioned for path in self.files)

    def caption(self, index: int) -> str:
        """The text of the .txt beside image ``index``; "" (the unconditional caption) when
        it has none."""
        caption = self._captioned.get(os.path.splitext(self.files[index])[0])
        if caption is None:
            return ""
        try:
            data = self.fs.cat_file(caption)
        except Exception as e:  # the storage failed, as for an image: never skipped
            raise OSError(f"caption of data file #{index} ({self.file_url(index)}) cannot be read: {_gist(e)}") from e
        return decode_caption(data)

    def file_url(self, index: int) -> str:
        """The URL of file ``index``, without credentials (for messages)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        path = self.files[index]
        return path if protocol in ("file", "local") else redact_url(f"{protocol}://{path}")

    def image(self, index: int) -> torch.Tensor:
        return self.load(index)[0]

    def load(self, index: int) -> tuple[torch.Tensor, bool]:
        """(image, whether it is the replacement of a file that does not decode)."""
        image, used = self.fetch(index)
        return image, used != index

    def fetch(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, the index of the file it came from: ``index``, or the replacement of a file
        that does not decode)."""
        try:
            return self._decode(index), index
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
            return image, candidate
        raise BadImageError(f"data.url {self.display_url!r}: cannot decode any of its {len(self.files)} "
                            "images (data.on_bad_image = \"skip\" needs at least one that decodes)")

    def _decode(self, index: int) -> torch.Tensor:

        if index in self._bad:
            raise BadImageError(self._bad[index])
        try:
            with self.fs.open(self.files[index], "rb") as f:
                data = f.read()
        except Exception as e:  # not a bad image: the storage failed; never skipped
            raise OSError(f"data file #{index} ({self.file_url(index)}) cannot be read: {_gist(e)}") from e
        try:
            return decode_image(data, self.size, self.resize)
        except ImageSizeError as e:  # a setting to choose, not a damaged file: never skipped
            raise ImageSizeError(f"data.url {self.display_url!r}: image #{index} ({self.file_url(index)}) {e}") from None
        except Exception as e:  # UnidentifiedImageError, truncated data, SyntaxError, bombs
            why = (f"data.url {self.display_url!r}: cannot decode image #{index} ({self.file_url(index)}): "
                   f"{_gist(e)}; fix or remove the file, or set data.on_bad_image = \"skip\"")
            self._bad[index] = why
            if self.on_bad_image == "skip":
                log.warning("%s — skipped: training on the next image that decodes", why.split("; fix")[0])
            raise BadImageError(why) from None


def caption_files(listing: list[str]) -> dict[str, str]:
    """Image path without its suffix -> the caption file of that name (``.txt``, any case)."""
    return {p[:-len(CAPTION_SUFFIX)]: p for p in listing if p.lower().endswith(CAPTION_SUFFIX)}


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {lines[0][:200] if lines else ''}")


def build(cfg: Config, size: int) -> FolderSource:
    assert cfg.data.url is not None  # guaranteed by config validation (the kind needs_url)
    return FolderSource(cfg.data.url, size, on_bad_image=cfg.data.on_bad_image, resize=cfg.data.resize)
