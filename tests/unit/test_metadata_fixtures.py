"""DCP ``.metadata`` written by every supported Python loads through the restricted unpickler
(Python 3.11.0-3.11.4 pickle Enum members as ``getattr(cls, name)``), and nothing
else of ``getattr`` does.

Fixtures (tests/fixtures/dcp_metadata/): py3.11.2 (Debian's /usr/bin/python3.11) and py3.11.7
were written by DCP itself with torch 2.13 (write_real.py); py3.12.1 and py3.13.0, Pythons for
which no torch wheel lies on this machine, were re-pickled from the 3.11.7 file by those
interpreters' own picklers with stand-ins for torch's classes (transplant.py).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata, TensorStorageMetadata

from service.checkpoint.errors import UnsafeCheckpointError
from service.checkpoint.safe_pickle import load_metadata

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dcp_metadata"
PYTHONS = ["3.11.2", "3.11.7", "3.12.1", "3.13.0"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("python", PYTHONS)
def test_metadata_of_every_supported_python_loads(python):
    metadata = load_metadata((FIXTURES / f"py{python}.metadata").read_bytes(), f"py{python}")
    assert isinstance(metadata, Metadata)
    items = metadata.state_dict_metadata
    assert set(items) == {"model.conv", "model.bias", "model.count", "train_state.step", "train_state.epoch",
                          "train_state.name"}
    bias = items["model.bias"]
    assert isinstance(bias, TensorStorageMetadata) and bias.properties.dtype is torch.bfloat16
    assert items["model.conv"].size == torch.Size([2, 3, 4, 5])
    assert items["model.conv"].properties.memory_format is torch.contiguous_format
    assert {info.relative_path for info in metadata.storage_data.values()} == {"__0_0.distcp"}


def test_the_fixture_of_debians_python_uses_getattr():
    """Guards the fixture itself: without getattr in it, the test above proves nothing."""
    assert b"getattr" in (FIXTURES / "py3.11.2.metadata").read_bytes()
    assert b"getattr" not in (FIXTURES / "py3.11.7.metadata").read_bytes()


class _Call:
    """Pickles as ``func(*args)``: what a hostile pickle can make REDUCE do."""

    def __init__(self, func, *args):  # type: ignore[no-untyped-def]
        self.func, self.args = func, args

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return self.func, self.args


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target,name", [
    (_MEM_FORMAT_ENCODING, "__class__"),            # an attribute that is not a member
    (_MEM_FORMAT_ENCODING, "_member_map_"),
    (Metadata, "__init__"),                         # an allowed class, but not an allowed Enum
    (torch.Size, "__new__"),
    (_MEM_FORMAT_ENCODING, 1),                      # not a name
])
def test_getattr_reaches_nothing_but_members_of_allowed_enums(target, name):
    data = pickle.dumps(_Call(getattr, target, name), protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="refusing getattr"):
        load_metadata(io.BytesIO(data), "hostile")


def test_a_member_by_name_is_the_member():
    """``getattr(_MEM_FORMAT_ENCODING, 'TORCH_CHANNELS_LAST')`` resolves, yet is no Metadata."""
    data = pickle.dumps(_Call(getattr, _MEM_FORMAT_ENCODING, "TORCH_CHANNELS_LAST"), protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="not DCP Metadata"):
        load_metadata(data, "member")
