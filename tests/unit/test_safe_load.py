"""Loading a checkpoint never runs code from storage: not from .metadata, not from a non-tensor item.

Storage is untrusted, and so is the manifest beside it: every attack here comes with a manifest
that matches the attacker's bytes.
"""

from __future__ import annotations

import copy
import os
import pathlib
import pickle
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from service.checkpoint import safe_pickle
from service.checkpoint.dcp_io import VerifyingReader, crc32c_hex, read_verified
from service.checkpoint.direct_read import DirectFileReader
from service.checkpoint.errors import CorruptCheckpointError, UnsafeCheckpointError
from service.checkpoint.manifest import FileEntry
from service.checkpoint.safe_pickle import ALLOWED_GLOBALS, load_metadata

EXTRA = {"step": 7, "name": "run-1", "values": [1, 2.5], "pair": (3, "x")}


def saved_state() -> dict[str, Any]:
    """A small model and its AdamW state after one step, plus non-tensor (BYTE_IO) items."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
        "bf16": torch.randn(9).to(torch.bfloat16),
        "extra": copy.deepcopy(EXTRA),
    }


def blank(state: dict[str, Any]) -> dict[str, Any]:
    """The same structure with every tensor zeroed and the extra items emptied."""
    out = copy.deepcopy(state)
    for value in _tensors(out):
        value.zero_()
    out["extra"] = {"step": 0, "name": "", "values": [], "pair": ()}
    return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def assert_bitwise(loaded: Any, expected: Any, where: str = "") -> None:
    if torch.is_tensor(expected):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape, where
        as_bytes = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(as_bytes(loaded), as_bytes(expected)), where
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys(), where
        for key in expected:
            assert_bitwise(loaded[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)) and any(_tensors(expected)):
        assert len(loaded) == len(expected), where
        for i, (a, b) in enumerate(zip(loaded, expected)):
            assert_bitwise(a, b, f"{where}.{i}")
    else:
        assert type(loaded) is type(expected) and loaded == expected, where


def manifest_of(folder: Path) -> dict[str, FileEntry]:
    """What an attacker who controls the bucket writes: a manifest matching the files as they are."""
    return {
        p.name: FileEntry(p.stat().st_size, crc32c_hex(p.read_bytes()))
        for p in folder.iterdir()
        if p.is_file()
    }


READERS: dict[str, Callable[[Path], Any]] = {
    "direct": lambda folder: DirectFileReader(str(folder)),
    "verifying": lambda folder: VerifyingReader(fsspec.filesystem("file"), str(folder), manifest_of(folder)),
}


def load(state: dict[str, Any], folder: Path, reader: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=READERS[reader](folder))


def load_error(state: dict[str, Any], folder: Path, reader: str) -> str:
    """The text of the load's failure. DCP reports a reader's error inside its own exception (a
    CheckpointException, or an AssertionError when it also tried rank-local metadata), so the
    checks look for our message in its text, not for our class."""
    with pytest.raises(BaseException) as info:
        load(state, folder, reader)
    return str(info.value)


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state = saved_state()
    folder = tmp_path / "ckpt"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))
    return folder, state


class Payload:
    """Pickles as a call that creates ``marker``: what a crafted checkpoint would do instead."""

    def __init__(self, call: str, marker: Path):
        self.call, self.marker = call, marker

    def __reduce__(self) -> tuple[Any, ...]:
        if self.call == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.call == "subprocess":
            return (subprocess.call, (["touch", str(self.marker)],))
        return (pathlib.Path.touch, (self.marker,))


CALLS = {"os.system": "posix.system", "subprocess": "subprocess.call", "Path.touch": "pathlib.Path.touch"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_real_checkpoint_loads_bitwise(checkpoint, reader):
    folder, state = checkpoint
    loaded = blank(state)
    load(loaded, folder, reader)
    assert_bitwise(loaded, state)


@pytest.mark.timeout(60)
def test_safe_metadata_equals_what_pickle_loads(checkpoint):
    folder, _ = checkpoint
    data = (folder / ".metadata").read_bytes()
    assert load_metadata(data, ".metadata") == pickle.loads(data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_code_in_metadata_is_refused_and_never_runs(checkpoint, tmp_path, reader, call):
    folder, state = checkpoint
    marker = tmp_path / "MARKER"
    evil = pickle.dumps(Payload(call, marker))
    pickle.loads(evil)  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()

    (folder / ".metadata").write_bytes(evil)
    error = load_error(blank(state), folder, reader)
    assert f"refusing to load {CALLS[call]}" in error
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=CALLS[call].replace(".", r"\.")):
        load_metadata(evil, ".metadata")
    assert not marker.exists()


# torch.save pickles with protocol 2, where Path.touch becomes getattr(Path, "touch").
ITEM_CALLS = {"os.system": "posix.system", "Path.touch": "builtins.getattr"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", sorted(ITEM_CALLS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_code_in_a_non_tensor_item_is_refused_and_never_runs(tmp_path, reader, call):
    """The attacker saves a checkpoint whose non-tensor item pickles as a call; DCP's own planner
    would torch.load it with weights_only=False and run it."""
    marker = tmp_path / "MARKER"
    folder = tmp_path / "ckpt"
    state = {"w": torch.randn(4, 4), "extra": Payload(call, marker)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))
    assert not marker.exists()

    # DCP's own reader runs it (the hole this closes).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        dcp.load({"w": torch.zeros(4, 4), "extra": None}, storage_reader=dcp.FileSystemReader(str(folder)))
    assert marker.exists()
    marker.unlink()

    error = load_error({"w": torch.zeros(4, 4), "extra": None}, folder, reader)
    assert "(item 'extra'): refers to" in error and ITEM_CALLS[call] in error
    assert not marker.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_metadata_that_is_not_metadata_is_refused(checkpoint, reader):
    folder, state = checkpoint
    (folder / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    assert "holds a builtins.dict, not DCP Metadata" in load_error(blank(state), folder, reader)
    with pytest.raises(UnsafeCheckpointError, match="not DCP Metadata"):
        load_metadata(pickle.dumps(torch.Size([1, 2])), ".metadata")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_item_files_outside_the_folder_are_refused(checkpoint, reader):
    folder, state = checkpoint
    metadata = load_metadata((folder / ".metadata").read_bytes(), ".metadata")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = f"../{folder.name}/{info.relative_path}"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    assert "outside the checkpoint folder" in load_error(blank(state), folder, reader)


def _global(module: str, name: str) -> bytes:
    """A protocol-4 pickle that only looks up module.name (and would return it)."""
    encode = lambda s: pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()
    return pickle.PROTO + b"\x04" + encode(module) + encode(name) + pickle.STACK_GLOBAL + pickle.STOP


DANGEROUS = [
    ("builtins", "eval"),
    ("builtins", "exec"),
    # builtins.getattr resolves, to a guard that hands out Enum members by name only
    # (Python 3.11.0-3.11.4 pickle them so): tests/unit/test_metadata_fixtures.py attacks it.
    ("builtins", "__import__"),
    ("builtins", "open"),
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("torch", "load"),  # torch's non-dtype attributes
    ("torch.serialization", "load"),
    ("pathlib", "Path"),  # Path.touch and friends: only the PosixPath constructor is allowed
    ("torch.distributed.checkpoint.metadata", "os.system"),  # dotted names reach other modules
    ("torch.distributed.checkpoint.metadata.os", "system"),  # no prefix matching
    ("torch.distributed", "checkpoint.metadata.Metadata"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("module", "name"), DANGEROUS)
def test_allowlist_refuses_what_could_run_code(module, name):
    assert (module, name) not in ALLOWED_GLOBALS
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {module}.{name}".replace(".", r"\.")):
        load_metadata(_global(module, name), ".metadata")


@pytest.mark.timeout(60)
def test_allowlist_is_exact_and_holds_only_dcp_classes_and_dtypes():
    modules = {module for module, _ in ALLOWED_GLOBALS}
    assert modules == {
        "torch",
        "torch.serialization",
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "pathlib",
        "pathlib._local",
    }
    torch_names = {name for module, name in ALLOWED_GLOBALS if module == "torch"}
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in torch_names - {"Size"})
    assert {"float32", "bfloat16", "int64", "uint8", "bool"} <= torch_names
    # An allowed global resolves (then fails the Metadata check): the pairs name real objects.
    with pytest.raises(UnsafeCheckpointError, match="holds a torch.dtype"):
        load_metadata(_global("torch", "float16"), ".metadata")


@pytest.mark.timeout(60)
def test_a_pickle_cannot_change_an_allowed_class():
    """BUILD on a class (not an instance) would set attributes on it for the whole process."""
    module = "torch.distributed.checkpoint.metadata"
    state = pickle.NONE + pickle.EMPTY_DICT + pickle.SHORT_BINUNICODE + b"\x05pwned" + pickle.NEWTRUE
    build = (
        _global(module, "Metadata")[:-1] + state + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.STOP
    )
    pickle.loads(build)  # a plain unpickler does it...
    assert Metadata.pwned is True  # type: ignore[attr-defined]
    del Metadata.pwned  # type: ignore[attr-defined]
    with pytest.raises(
        UnsafeCheckpointError, match="the class torch.distributed.checkpoint.metadata.Metadata"
    ):
        load_metadata(build, ".metadata")
    assert not hasattr(Metadata, "pwned")


@pytest.mark.timeout(60)
def test_garbage_metadata_is_corrupt_not_unsafe():
    with pytest.raises(CorruptCheckpointError, match="not a DCP metadata pickle") as info:
        load_metadata(b"\x80\x04garbage", ".metadata")
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert issubclass(UnsafeCheckpointError, CorruptCheckpointError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad_name", ["../outside", "/abs/outside", "sub/outside", "..", ""])
def test_manifest_names_cannot_lead_reads_out_of_the_folder(tmp_path, bad_name):
    """A caller joins manifest names to the folder; an entry for the base name alone must not
    let a read of folder/<bad name> through."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    entry = FileEntry(6, crc32c_hex(b"secret"))
    expected = {bad_name: entry, "outside": entry, ".metadata": entry}
    fs = fsspec.filesystem("file")
    with pytest.raises(CorruptCheckpointError, match="not a plain file name"):
        read_verified(fs, os.path.join(str(folder), bad_name), expected)
    with pytest.raises(CorruptCheckpointError, match="not a plain file name"):
        read_verified(fs, os.path.join(str(folder), ".metadata"), expected)
    assert read_verified(fs, str(outside), {"outside": entry}) == b"secret"  # plain names still work


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_non_tensor_item_is_loaded_weights_only(checkpoint, reader, monkeypatch):
    folder, state = checkpoint
    sources: list[str] = []
    original = safe_pickle.load_weights_only
    monkeypatch.setattr(
        safe_pickle,
        "load_weights_only",
        lambda data, source: sources.append(source) or original(data, source),
    )
    loaded = blank(state)
    load(loaded, folder, reader)
    assert_bitwise(loaded, state)
    metadata = load_metadata((folder / ".metadata").read_bytes(), ".metadata")
    byte_items = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    assert len(sources) == len(byte_items) > len(EXTRA)  # the extras and AdamW's param_groups
    assert "(item 'extra.name')" in " ".join(sources) and all(".distcp" in s for s in sources)
