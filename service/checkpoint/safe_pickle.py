"""Reading a checkpoint without running code from storage.

Storage is untrusted input: whoever can write the bucket can write the manifest too, so its
CRC-32C proves the bytes are the ones written, not who wrote them. DCP trusts storage in two
places, and either one runs whatever a crafted ``__reduce__`` asks for: its readers
``pickle.load`` the ``.metadata`` file, and its default planner ``torch.load``s every
non-tensor (BYTE_IO) item with ``weights_only=False``. ``SafeFileSystemReader``, which both of
our readers (``dcp_io``, ``direct_read``) build on, closes both:

* ``.metadata`` goes through an unpickler that resolves only the globals DCP's metadata is
  made of (``ALLOWED_GLOBALS``) and that lets ``BUILD`` fill in only fresh instances of DCP's
  metadata classes, so a pickle cannot change a class or shared object for the whole process;
* a BYTE_IO item is loaded with ``weights_only=True`` first, and the planner gets bytes that
  we re-serialised from that result, never the stored ones, so its ``weights_only=False``
  load only ever sees objects the weights-only unpickler accepted. (Re-serialising rather
  than passing the checked bytes on leaves no room for the two unpicklers to disagree.)

Tensor items need nothing: DCP (torch 2.11 to 2.14) and ``direct_read`` read them with
``weights_only=True`` already. Also, a file name in the metadata is joined to the checkpoint
folder, so one that is not a plain name is refused (``is_plain_name``).
"""

from __future__ import annotations

import enum
import functools
import io
import os
import pathlib
import pickle
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO, Any, ClassVar, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from service.checkpoint.errors import CorruptCheckpointError, UnsafeCheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
# Every global a DCP .metadata pickle refers to, found by recording find_class while
# loading real checkpoints (model + AdamW, non-tensor items, every dtype, channels_last) on
# torch 2.13 and 2.14. Exact (module, name) pairs: no module prefixes, no dotted names (with
# protocol 4, ``(_METADATA, "os.system")`` would otherwise reach os through the module).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_METADATA, "Metadata"),
        (_METADATA, "MetadataIndex"),
        (_METADATA, "StorageMeta"),
        (_METADATA, "TensorStorageMetadata"),
        (_METADATA, "BytesStorageMetadata"),
        (_METADATA, "ChunkStorageMetadata"),
        (_METADATA, "TensorProperties"),
        (_METADATA, "_MEM_FORMAT_ENCODING"),  # an Enum: called with the encoded memory format
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # layouts pickle as _get_layout("torch.strided")
        # StorageMeta.checkpoint_id, when the writer was given a Path (dcp.FileSystemWriter);
        # Python 3.13 keeps the class in pathlib._local.
        ("pathlib", "PosixPath"),
        ("pathlib._local", "PosixPath"),
    }
    # A dtype pickles as the global torch.<name> (its __reduce__ returns the name): allow
    # exactly the attributes of torch that are dtypes, not the rest of the module.
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)

# Python 3.11.0 to 3.11.4 pickle an Enum member as ``getattr(<its class>, <its name>)``, later
# ones as ``<its class>(<its value>)``. ``builtins.getattr`` therefore resolves, but only to
# ``_enum_member``, which hands out members of these classes by name and nothing else.
ENUMS_BY_NAME: frozenset[type[enum.Enum]] = frozenset({_MEM_FORMAT_ENCODING})

# The only objects BUILD may fill in: fresh instances of DCP's metadata classes (made by
# NEWOBJ in the same pickle). BUILD on anything else — a class, an Enum member, a function —
# would change it for the whole process.
_BUILDABLE: frozenset[type] = frozenset(
    {
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorStorageMetadata,
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        _StorageInfo,
    }
)


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler: unlike the C one, it lets us check BUILD as well as globals.

    It is about half as fast; .metadata is loaded once per load, and is small next to the
    shards (0.4 s instead of 0.2 s for 5,000 tensors).
    """

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file, fix_imports=False)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return functools.partial(_enum_member, self.source)
        if (module, name) == ("pathlib._local", "PosixPath"):
            return pathlib.PosixPath  # written by 3.13+; older Pythons keep it in pathlib itself
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                self.source,
                f"refusing to load {module}.{name}: DCP metadata is never made of it, and "
                "loading it could run code",
            )
        return super().find_class(module, name)

    def _load_build(self) -> None:
        target = self.stack[-2]  # BUILD pops the state; the object is beneath it
        if type(target) not in _BUILDABLE:
            raise UnsafeCheckpointError(
                self.source,
                f"refusing to set the state of {_describe(target)}: only DCP's "
                "metadata objects are built by its pickles",
            )
        super().load_build()

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = {
        **pickle._Unpickler.dispatch,  # type: ignore[attr-defined]
        pickle.BUILD[0]: _load_build,
    }


def _enum_member(source: str, cls: Any, name: Any) -> enum.Enum:
    """What ``getattr(cls, name)`` in a DCP metadata pickle may be: a member of an allowed Enum,
    named exactly (no other attribute of the class, let alone of anything else)."""
    if cls not in ENUMS_BY_NAME or not isinstance(name, str) or name not in cls.__members__:
        raise UnsafeCheckpointError(
            source, f"refusing getattr({_describe(cls)}, {str(name)[:60]!r}): DCP metadata only ever "
            "names a member of its own Enums this way, and other attributes could run code")
    return cast(enum.Enum, cls[name])


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def load_metadata(data: bytes | IO[bytes], source: str) -> Metadata:
    """DCP ``Metadata`` from a ``.metadata`` pickle, without running code from it.

    ``source`` names the file in errors. Raises ``UnsafeCheckpointError`` for a pickle that
    refers to anything outside ``ALLOWED_GLOBALS`` or is not a ``Metadata``, and
    ``CorruptCheckpointError`` for one that is not a valid pickle.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        metadata = _MetadataUnpickler(stream, source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled: whatever the parser tripped over
        raise CorruptCheckpointError(source, f"not a DCP metadata pickle ({type(e).__name__}: {e})") from None
    if type(metadata) is not Metadata:
        raise UnsafeCheckpointError(source, f"holds {_describe(metadata)}, not DCP Metadata")
    return metadata


def load_weights_only(data: bytes, source: str) -> Any:
    """The object a BYTE_IO item holds, loaded with ``weights_only=True``.

    The weights-only unpickler refuses a global outside its allowlist when it meets it,
    before anything is called; that refusal becomes an ``UnsafeCheckpointError`` naming the
    globals. Any other failure (a damaged record) propagates as torch raised it.
    """
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _unsafe_globals(data)
        what = f"refers to {', '.join(refused)}" if refused else f"is refused ({_gist(e)})"
        raise UnsafeCheckpointError(
            source, f"{what}; non-tensor items are loaded weights-only, which allows no code"
        ) from None


def _unsafe_globals(data: bytes) -> list[str]:
    """The globals a torch.save'd record names that weights-only loading refuses (a static scan)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:  # not a zip record: the unpickler's own message says what it refused
        return []


def _gist(error: Exception) -> str:
    """The line of torch's weights-only message that names the problem, not its advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0][:300]


def is_plain_name(name: str) -> bool:
    """A file name that, joined to a folder, stays in that folder."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


class _WeightsOnlyBytes:
    """The planner, except that ``load_bytes`` only ever gets re-serialised, checked objects.

    A proxy rather than a planner of our own: the caller's planner decides where each item
    goes (DCP's default one unflattens the state dict), and this works for any planner.
    """

    def __init__(self, planner: LoadPlanner, source_of: Callable[[ReadItem], str]):
        self._planner, self._source_of = planner, source_of

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        source = f"{self._source_of(read_item)} (item {read_item.dest_index.fqn!r})"
        checked = io.BytesIO()
        torch.save(load_weights_only(value.read(), source), checked)
        checked.seek(0)
        self._planner.load_bytes(read_item, checked)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader without the two places where it runs code from storage.

    ``listed_files``: when set (the manifest's file names), a ``.metadata`` naming any other
    file is refused — a reader that opens files by path must not read unchecksummed ones.
    """

    listed_files: set[str] | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.fspath(self._get_metadata_path(kwargs.get("rank")))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, path)
        _check_listed(metadata, path, self.listed_files)
        # What FileSystemReader.read_metadata does after its pickle.load.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        return super().read_data(plan, cast(LoadPlanner, _WeightsOnlyBytes(planner, self._file_of)))

    def _file_of(self, item: ReadItem) -> str:
        return os.path.join(os.fspath(self.path), self.storage_data[item.storage_index].relative_path)


def check_metadata_files(data: bytes, source: str, listed: set[str]) -> None:
    """The ``.metadata`` in ``data`` is safe to load and every item lives in a file of the
    checkpoint folder that the manifest lists (and so was checksummed)."""
    _check_listed(load_metadata(data, source), source, listed)


def _check_listed(metadata: Metadata, source: str, listed: set[str] | None) -> None:
    _check_storage_data(metadata, source)
    if listed is None:
        return
    unlisted = sorted({info.relative_path for info in metadata.storage_data.values()} - listed)
    if unlisted:
        raise UnsafeCheckpointError(source, f"items are stored in files the manifest does not list: {unlisted[:3]}")


def _check_storage_data(metadata: Metadata, source: str) -> None:
    """Every item must live in a file directly inside the checkpoint folder."""
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise UnsafeCheckpointError(source, f"storage_data is {_describe(storage)}, not a dict")
    for index, info in storage.items():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise UnsafeCheckpointError(source, f"storage_data for {index} is {_describe(info)}")
        if not is_plain_name(info.relative_path):
            raise UnsafeCheckpointError(
                source, f"item {index} is stored in {info.relative_path!r}, outside the checkpoint folder"
            )
