"""Manifest validation (its bytes are untrusted) and checkpoint names in URLs (step-150 =
step-000000150)."""

from __future__ import annotations

import json

import pytest

from service.checkpoint.catalog import split_checkpoint_url
from service.checkpoint.errors import ManifestError
from service.checkpoint.manifest import FileEntry, Manifest, parse_step_dir, step_dir


def _body(**files: object) -> dict:
    return {
        "format": "ftdiff-checkpoint/1", "step": 4, "world_size": 2, "config_hash": "h", "time": 1.5,
        "files": {".metadata": {"size": 10, "crc32c": "0a1b2c3d"}, **files},
    }


def _parse(body: dict) -> Manifest:
    return Manifest.from_json(json.dumps(body).encode())


@pytest.mark.timeout(10)
def test_accepts_every_name_dcp_and_ftdiff_write():
    names = ["__0_0.distcp", "__12_3.distcp", "__0_i3_0.distcp", "__1_i12_run_7.distcp", "__0.metadata",
             "__15.metadata"]
    m = _parse(_body(**{n: {"size": 0, "crc32c": "00000000"} for n in names}))
    assert set(m.files) == {".metadata", *names}
    assert m.files[".metadata"] == FileEntry(10, "0a1b2c3d")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["../x.distcp", "/etc/passwd", "a/__0_0.distcp", "__0_0.distcp/..", "x.distcp",
                                  "__a_0.distcp", "__0_0.distcp.tmp", "__0_0-1.distcp", ".metadata.bak", "",
                                  "__0_0.distcp\x00"])
def test_refuses_names_dcp_never_writes(name):
    with pytest.raises(ManifestError) as e:
        _parse(_body(**{name: {"size": 1, "crc32c": "00000000"}}))
    assert repr(name)[:20] in str(e.value) and "not a file name" in str(e.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("entry,needle", [
    ({"size": -1, "crc32c": "00000000"}, "size -1"),
    ({"size": "12", "crc32c": "00000000"}, "size '12'"),
    ({"size": 1.5, "crc32c": "00000000"}, "size 1.5"),
    ({"size": True, "crc32c": "00000000"}, "size True"),
    ({"size": 1, "crc32c": "0A1B2C3D"}, "crc32c"),
    ({"size": 1, "crc32c": "abc"}, "crc32c"),
    ({"size": 1, "crc32c": 12345678}, "crc32c"),
    ({"size": 1}, "crc32c None"),
    ([1, "00000000"], "not an object"),
])
def test_refuses_bad_sizes_and_checksums_naming_the_entry(entry, needle):
    with pytest.raises(ManifestError) as e:
        _parse(_body(**{"__0_0.distcp": entry}))
    assert "'__0_0.distcp'" in str(e.value) and needle in str(e.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("change,needle", [
    ({"step": -1}, "step"), ({"world_size": 0}, "world_size"), ({"step": "4"}, "step"),
    ({"files": []}, "files"), ({"incarnation": -2}, "incarnation"), ({"fingerprint": [1]}, "fingerprint"),
    ({"format": "other/9"}, "format"),
])
def test_refuses_bad_header_fields(change, needle):
    with pytest.raises(ManifestError, match=needle):
        _parse({**_body(), **change})
    with pytest.raises(ManifestError):
        Manifest.from_json(b"[1, 2]")


@pytest.mark.timeout(10)
def test_run_id_incarnation_fingerprint_round_trip_and_default():
    m = Manifest(7, 1, "h", {".metadata": FileEntry(3, "deadbeef")}, run_id="run-a", incarnation=3,
                 fingerprint={"run.seed": 0, "data.length": 60})
    back = Manifest.from_json(m.to_json())
    assert (back.run_id, back.incarnation, back.fingerprint) == ("run-a", 3, {"run.seed": 0, "data.length": 60})
    old = _parse(_body())  # written before these fields existed
    assert (old.run_id, old.incarnation, old.fingerprint) == (None, None, {})
    assert _parse({**_body(), "some_future_field": 1}).step == 4  # unknown keys are tolerated


@pytest.mark.timeout(10)
def test_step_names_any_padding_in_urls_canonical_in_listings():
    assert parse_step_dir("step-000000150") == 150
    assert parse_step_dir("step-150") is None  # a hand-made folder is not a checkpoint folder
    assert parse_step_dir("step-150", canonical=False) == 150
    assert parse_step_dir("step-1234567890") == 1234567890
    assert step_dir(150) == "step-000000150"
    for url, expected in [
        ("runs/x", ("runs/x", None)),
        ("runs/x/step-150", ("runs/x", 150)),
        ("runs/x/step-000000150/", ("runs/x", 150)),
        ("s3://bucket/run/step-7", ("s3://bucket/run", 7)),
        ("s3://bucket/step-7", ("s3://bucket", 7)),
        ("s3://step-7", ("s3://step-7", None)),  # a bucket named step-7
        ("/abs/step-12", ("/abs", 12)),
        ("step-3", (".", 3)),
        ("runs/x/step-", ("runs/x/step-", None)),
    ]:
        assert split_checkpoint_url(url) == expected, url
