"""DirectFileReader loads exactly what DCP's own reader loads, taking its fast path where it can."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from service.checkpoint import direct_read
from service.checkpoint.direct_read import DirectFileReader


def saved_state() -> dict:
    torch.manual_seed(0)
    base = torch.randn(10)
    return {
        "fp32": torch.randn(64, 33),
        "bf16": torch.randn(17).to(torch.bfloat16),
        "int_scalar": torch.tensor(12345, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "view_of_larger_storage": base[2:7],  # torch.save writes the whole storage
        "transposed": torch.randn(5, 3).t(),
        "extra": {"name": "run-1", "values": [1, 2.5]},  # a non-tensor (BYTE_IO) item
    }


def zeroed_like(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        out[key] = torch.zeros_like(value) if torch.is_tensor(value) else {"name": "", "values": []}
    return out


def assert_loaded(loaded: dict, expected: dict) -> None:
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value


@pytest.mark.timeout(60)
def test_loads_every_kind_of_item_bitwise(tmp_path, monkeypatch):
    state = saved_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    direct_reads = []
    original = direct_read._pread_exactly
    monkeypatch.setattr(direct_read, "_pread_exactly", lambda *a: direct_reads.append(1) or original(*a))

    loaded = zeroed_like(state)
    dcp.load(loaded, storage_reader=DirectFileReader(str(tmp_path)))
    assert_loaded(loaded, state)
    # The plain contiguous tensors took the one-copy path; the saved view (whose record holds
    # the whole base storage) went through DCP's general path and still loaded correctly.
    assert len(direct_reads) == 5  # fp32, bf16, int_scalar, flags, empty

    reference = zeroed_like(state)
    dcp.load(reference, storage_reader=dcp.FileSystemReader(str(tmp_path)))
    assert_loaded(reference, state)


@pytest.mark.timeout(60)
def test_into_a_non_contiguous_destination_uses_dcp_path(tmp_path):
    value = torch.randn(6, 4)
    dcp.save({"w": value}, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    dest = torch.zeros(4, 6).t()  # same shape, transposed memory
    dcp.load({"w": dest}, storage_reader=DirectFileReader(str(tmp_path)))
    assert torch.equal(dest, value)


@pytest.mark.timeout(60)
def test_truncated_file_fails_the_load(tmp_path):
    dcp.save({"w": torch.randn(256, 256)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    shard = next(p for p in tmp_path.iterdir() if p.suffix == ".distcp")
    os.truncate(shard, shard.stat().st_size - 4096)
    # The zip directory of the record is gone, so DCP's general path reports the damage.
    with pytest.raises(BaseException, match="central directory|bytes before the end"):
        dcp.load({"w": torch.zeros(256, 256)}, storage_reader=DirectFileReader(str(tmp_path)))
