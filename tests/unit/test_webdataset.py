"""Sharded data sets in one process: pack and index, the shard order, bad shards and members,
the shard cache (retries, eviction, progress), the index in the run's identity. (Training on
shards from the real S3 server with kills and resizes: tests/integration/test_webdataset_s3.py.)"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from service.config import load_config
from service.data.images import BadImageError
from service.data.pack import index_shards, inspect, pack_folder, parse_size
from service.data.shard_cache import BadShardError, ShardCache
from service.data.shard_index import ShardIndex
from service.data.shard_order import ShardedOrder
from service.data.stream import TrainingSamples, build_source
from service.errors import StorageError, UserError

pytestmark = pytest.mark.timeout(120)


def image_folder(root: Path, per_class: int = 9, classes=("cat", "dog")) -> Path:
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (20, 16), (25 * i, 100 * c, 60)).save(root / name / f"{i:02d}.png")
            if i % 3:
                (root / name / f"{i:02d}.txt").write_text(f"a {name} {i}")
    return root


def shards_cfg(url: Path | str, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, ['data.kind="webdataset"', f'data.url="{url}"', "data.shuffle_window=5", 'data.resize="resize"', *extra])


@pytest.fixture
def packed(tmp_path) -> tuple[Path, Path]:
    src = image_folder(tmp_path / "src")
    pack_folder(str(src), str(tmp_path / "shards"), shard_bytes=6000)
    return src, tmp_path / "shards"


def test_a_packed_folder_yields_the_folders_images_labels_and_captions(packed):
    src, shards = packed
    folder = build_source(load_config(None, ['data.kind="folder"', f'data.url="{src}"', 'data.resize="resize"']))
    source = build_source(shards_cfg(shards))
    assert len(source) == len(folder) == 18 and len(source.shards) > 3
    assert source.num_classes == 2 and source.num_captioned == 12
    for i in range(18):  # packed in the folder's sorted order
        assert torch.equal(source.image(i), folder.image(i))
        assert source.label(i) == folder.label(i) and source.caption(i) == folder.caption(i)


def test_packing_is_deterministic_and_never_overwrites_a_data_set(packed, tmp_path):
    src, shards = packed
    again = pack_folder(str(src), str(tmp_path / "again"), shard_bytes=6000)
    assert again.digest() == ShardIndex.from_json((shards / "index.json").read_text(), "x").digest()
    with pytest.raises(UserError, match="already holds a data set"):
        pack_folder(str(src), str(shards), shard_bytes=6000)
    text = inspect(str(shards))
    assert "18 samples in" in text and "captioned: 12 of 18" in text and "cat" in text and "000000000:" in text


def test_existing_shards_are_indexed_once_by_the_index_command(packed, tmp_path):
    _, shards = packed
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        (bare / tar.name).write_bytes(tar.read_bytes())
    index = index_shards(str(bare))
    assert index.num_samples == 18 and index.num_captioned == 12
    source = build_source(shards_cfg(bare))
    assert source.num_classes == 2 and sorted({source.label(i) for i in range(18)}) == [0, 1]
    with pytest.raises(UserError, match="no index.json: pack a folder with `ftdiff data pack"):
        build_source(shards_cfg(tmp_path / "src"))


def test_the_order_is_a_permutation_per_epoch_read_window_by_window():
    sizes = [7, 3, 9, 5, 6, 10]
    order = ShardedOrder(sizes, seed=3, window=8)
    n = sum(sizes)
    for epoch in range(3):
        ids = [order.locate(epoch * n + p)[2] for p in range(n)]
        assert sorted(ids) == list(range(n))
    assert [order.locate(p)[2] for p in range(n)] != [order.locate(n + p)[2] for p in range(n)]
    assert [order.locate(p)[2] for p in range(n)] == [ShardedOrder(sizes, 3, 8).locate(p)[2] for p in range(n)]
    for start in range(0, 2 * n, 8):  # one window reads at most window / smallest shard + 1 shards
        touched = {order.shard_of(order.locate(p)[2])[0] for p in range(start, min(start + 8, 2 * n))}
        assert len(touched) <= 8 // 3 + 2
        assert touched <= set(order.shards_ahead(start, 8))


def test_a_corrupt_truncated_or_missing_shard_is_named(packed):
    _, shards = packed
    first = sorted(shards.glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    source = build_source(shards_cfg(shards))
    with pytest.raises(BadShardError, match=r"shard-000000.tar is changed since it was indexed"):
        source.image(0)
    first.write_bytes(bytes(data[:1000]))
    with pytest.raises(BadShardError, match="is truncated"):
        build_source(shards_cfg(shards)).image(0)
    first.unlink()
    with pytest.raises(BadShardError, match="shard-000000.tar is missing"):
        build_source(shards_cfg(shards)).image(0)


def test_skipping_replaces_bad_samples_deterministically_and_counts_them(packed):
    _, shards = packed
    sorted(shards.glob("*.tar"))[1].unlink()
    cfg = shards_cfg(shards, 'data.on_bad_image="skip"')
    source = build_source(cfg)
    lost = source.shards[1].samples
    samples = TrainingSamples(source, 0, 100, True)
    got = [samples[p] for p in range(18)]
    again = [TrainingSamples(build_source(cfg), 0, 100, True)[p] for p in range(18)]
    assert [int(g["source_index"]) for g in got] == [int(a["source_index"]) for a in again]
    assert all(torch.equal(g["image"], a["image"]) for g, a in zip(got, again))
    assert sum(int(g["bad_image"]) for g in got) == lost


def test_an_undecodable_member_is_named_or_skipped(tmp_path):
    src = image_folder(tmp_path / "src", per_class=3)
    (src / "cat" / "01.png").write_bytes(b"not a png")
    pack_folder(str(src), str(tmp_path / "shards"), shard_bytes=10**6)
    with pytest.raises(BadImageError, match=r"shard-000000.tar: cannot decode 000000001"):
        build_source(shards_cfg(tmp_path / "shards")).image(1)
    skipping = build_source(shards_cfg(tmp_path / "shards", 'data.on_bad_image="skip"'))
    image, used = skipping.fetch(1)
    assert used == 2 and skipping.bad_images == 1


def _memory_shards(packed, name: str) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    _, shards = packed
    for f in shards.iterdir():
        fs.pipe_file(f"/{name}/{f.name}", f.read_bytes())
    return f"memory://{name}"


def test_the_cache_downloads_each_shard_once_counts_its_bytes_and_keeps_to_its_limit(packed, tmp_path):
    url = _memory_shards(packed, "cache-test")
    source = build_source(shards_cfg(url, f'data.cache_dir="{tmp_path / "cache"}"'))
    cache = source.cache
    cache.limit_bytes = 2 * max(s.bytes for s in source.shards)
    for i in range(len(source)):
        source.image(i)
    assert cache.bytes_read == sum(s.bytes for s in source.shards)  # each shard fetched once
    kept = [p for p in cache.cache_dir.iterdir() if not p.name.startswith(".")]
    assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= cache.limit_bytes


def test_transient_read_errors_are_retried_and_denial_is_a_storage_error(packed, tmp_path, monkeypatch):
    import fsspec

    url = _memory_shards(packed, "flaky")
    index = ShardIndex.from_json(fsspec.filesystem("memory").cat_file("/flaky/index.json").decode(), "x")
    cache = ShardCache(url, tmp_path / "c", 10**9, retry_s=5)
    real_open, failures = cache.fs.open, []

    def flaky_open(path, mode="rb", **kw):  # type: ignore[no-untyped-def]
        if len(failures) < 2:
            failures.append(path)
            raise ConnectionResetError("connection reset by peer")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(cache.fs, "open", flaky_open)
    monkeypatch.setattr("service.data.shard_cache.time.sleep", lambda s: None)
    assert cache.path(index.shards[0]).read_bytes()[:100] == (packed[1] / index.shards[0].name).read_bytes()[:100]
    assert len(failures) == 2

    def denied(path, mode="rb", **kw):  # type: ignore[no-untyped-def]
        raise PermissionError("Access Denied")

    monkeypatch.setattr(cache.fs, "open", denied)
    with pytest.raises(StorageError, match="access denied"):
        cache.path(index.shards[1])
    monkeypatch.setattr(cache.fs, "open", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("read timed out")))
    cache.retry_s = 0
    with pytest.raises(StorageError, match="after 0s of retries"):
        cache.path(index.shards[2])


def test_another_index_is_another_run(packed, tmp_path):
    from service.checkpoint.identity import differences, fingerprint
    from service.data.stream import data_identity

    src, shards = packed
    cfg = shards_cfg(shards)
    saved = fingerprint(cfg, data_length=18, data=data_identity(build_source(cfg)))
    other = tmp_path / "other"
    pack_folder(str(src), str(other), shard_bytes=3000)  # the same images, sharded otherwise
    moved = shards_cfg(other)
    hard, _ = differences(saved, fingerprint(moved, data_length=18, data=data_identity(build_source(moved))))
    assert any(line.startswith("data.index:") for line in hard)


def test_shard_sizes_parse():
    assert parse_size("256MB") == 256 * 10**6 and parse_size("1gb") == 10**9 and parse_size("512") == 512
    for bad in ("lots", "-5", "0"):
        with pytest.raises(UserError, match="--shard-size"):
            parse_size(bad)


def test_a_shard_that_is_not_a_tar_is_named(tmp_path):
    from service.data.webdataset import scan_shard

    with pytest.raises(BadShardError, match="x.tar is not a readable tar"):
        scan_shard(io.BytesIO(b"\x00garbage" * 100), "x.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a.cls", b"1"), ("a.png", b"p"), ("b.json", b'{"caption": " hi "}'), ("b.jpg", b"j")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    samples = scan_shard(buf, "y.tar")
    assert [(s.key, s.label, s.caption) for s in samples] == [("a", 1, ""), ("b", None, "hi")]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_label_that_is_not_a_class_id_is_refused_when_indexed(tmp_path):
    (tmp_path / "neg").mkdir()
    _tar(tmp_path / "neg" / "0.tar", {"a.png": _png(), "a.cls": b"-1", "b.png": _png(), "b.cls": b"1"})
    with pytest.raises(UserError, match=r"0.tar: a.cls is '-1', not a class id"):
        index_shards(str(tmp_path / "neg"))


def test_a_class_run_refuses_unlabelled_samples_before_training(tmp_path):
    from service.data.stream import training_labels

    (tmp_path / "part").mkdir()
    _tar(tmp_path / "part" / "0.tar", {"a.png": _png(), "a.cls": b"0", "b.png": _png(), "c.png": _png(), "c.cls": b"1"})
    index_shards(str(tmp_path / "part"))
    cfg = shards_cfg(tmp_path / "part", 'model.conditioning="class"', "model.num_classes=2")
    with pytest.raises(UserError, match="1 of 3 in data.url have none"):
        training_labels(cfg, build_source(cfg))


def test_an_index_that_cannot_be_right_is_refused(packed):
    import json

    _, shards = packed
    body = json.loads((shards / "index.json").read_text())
    for tamper, needle in ((lambda b: b["shards"][0].update(name="../elsewhere.tar"), "not a path inside"),
                           (lambda b: b["shards"][0].update(labels={"cat": 3}), "labels outside"),
                           (lambda b: b["shards"][0].update(captioned=10**6), "more labels or captions")):
        copy = json.loads(json.dumps(body))
        tamper(copy)
        with pytest.raises(UserError, match=needle):
            ShardIndex.from_json(json.dumps(copy), "index.json")


def test_pack_takes_what_the_folder_source_takes(tmp_path):
    from PIL import Image

    src = tmp_path / "odd"
    (src / "a").mkdir(parents=True)
    for name in ("photo.v2.png", "UPPER.PNG", "über ñ.png", "img.jpeg.JPG", "pic.webp"):
        Image.new("RGB", (12, 12), (9, 99, 199)).save(src / "a" / name)
    (src / "a" / "UPPER.TXT").write_text("loud")
    (src / "a" / "photo.v2.txt").write_text("second take")
    index = pack_folder(str(src), str(tmp_path / "shards"), shard_bytes=10**6)
    folder = build_source(load_config(None, ['data.kind="folder"', f'data.url="{src}"', 'data.resize="resize"']))
    source = build_source(shards_cfg(tmp_path / "shards"))
    assert index.num_samples == len(folder) == 5 and index.num_captioned == 2
    assert [source.caption(i) for i in range(5)] == [folder.caption(i) for i in range(5)]
    assert sorted(c for c in (source.caption(i) for i in range(5)) if c) == ["loud", "second take"]
    with pytest.raises(UserError, match="does not exist"):
        pack_folder(str(tmp_path / "nowhere"), str(tmp_path / "x"), shard_bytes=10**6)
    with pytest.raises(UserError, match="--shard-size"):
        parse_size("inf")


def test_bad_data_is_named_by_the_file_it_came_from_and_skipped_shards_are_logged(tmp_path, caplog):
    src = image_folder(tmp_path / "src", per_class=3)
    (src / "cat" / "01.png").write_bytes(b"not a png")
    pack_folder(str(src), str(tmp_path / "shards"), shard_bytes=3000)
    with pytest.raises(BadImageError, match=r"cannot decode 000000001 \(packed from cat/01.png\)") as e:
        build_source(shards_cfg(tmp_path / "shards")).image(1)
    assert "0x" not in str(e.value)  # no object addresses in messages
    last = sorted((tmp_path / "shards").glob("*.tar"))[-1]
    last.unlink()
    skipping = build_source(shards_cfg(tmp_path / "shards", 'data.on_bad_image="skip"'))
    with caplog.at_level("WARNING", logger="service.data.webdataset"):
        skipping.fetch(len(skipping) - 1)
    assert any(f"{last.name} is missing" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
