from collections import Counter

import pytest
import torch

from service.checkpoint.identity import MATH_KEYS
from service.config import load_config
from service.data.digits import DigitsSource
from service.data.folder import FolderSource
from service.data.generated import SyntheticSource
from service.data.registry import SOURCES
from service.data.stream import (
    GlobalOrder,
    TrainingSamples,
    build_loader,
    check_batch_geometry,
    rank_positions,
)
from service.errors import UserError

N = 60  # samples per epoch in these tests; not a multiple of the batch on purpose
GB = 12


def consumed(world: int, start_pos: int, steps: int) -> list[int]:
    """Source indices every rank trains on for `steps` global batches from `start_pos`."""
    order = GlobalOrder(N, seed=3)
    out = []
    for k in range(steps):
        for rank in range(world):
            for p in rank_positions(start_pos + k * GB, GB, rank, world):
                out.append(order.locate(p))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_sample_exactly_once_per_epoch(world):
    located = consumed(world, 0, steps=N // GB * 3)  # three whole epochs
    for epoch in range(3):
        idx = [src for e, _, src in located if e == epoch]
        assert sorted(idx) == list(range(N)), f"epoch {epoch}"


@pytest.mark.parametrize("world,resume_world", [(2, 2), (2, 3), (3, 1)])
def test_resume_at_arbitrary_position_continues_exactly(world, resume_world):
    steps_before = 7  # 84 samples: mid-epoch 1
    before = consumed(world, 0, steps_before)
    after = consumed(resume_world, steps_before * GB, 10)
    full = consumed(1, 0, steps_before + 10)
    assert sorted(before + after) == sorted(full)
    assert Counter(before + after) == Counter(full)


def test_world_size_does_not_change_the_global_batch():
    for step in range(5):
        one = rank_positions(step * GB, GB, 0, 1)
        three = sum((rank_positions(step * GB, GB, r, 3) for r in range(3)), [])
        assert one == three


def test_epoch_permutations_differ_and_are_seeded():
    a, b = GlobalOrder(N, 0), GlobalOrder(N, 0)
    assert torch.equal(a.permutation(0), b.permutation(0))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), GlobalOrder(N, 1).permutation(0))


def test_per_sample_noise_is_a_pure_function():
    src = SyntheticSource(16, N, seed=0)
    s1 = TrainingSamples(src, seed=0, num_timesteps=1000, hflip=True)
    s2 = TrainingSamples(SyntheticSource(16, N, seed=0), seed=0, num_timesteps=1000, hflip=True)
    for p in (0, 5, N + 5):
        a, b = s1[p], s2[p]
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(s1[0]["noise"], s1[1]["noise"])
    # The same source image in another epoch gets other noise.
    assert not torch.equal(s1[5]["noise"], s1[N + 5]["noise"])
    assert not torch.equal(s1[0]["noise"], TrainingSamples(src, seed=1, num_timesteps=1000, hflip=True)[0]["noise"])


@pytest.mark.multiprocess
def test_loader_worker_count_does_not_change_batches():
    src = SyntheticSource(16, N, seed=0)
    samples = TrainingSamples(src, seed=0, num_timesteps=1000, hflip=True)
    batches = []
    for workers in (0, 2):
        loader = build_loader(samples, start_position=24, num_steps=4, global_batch=GB, rank=1,
                              world_size=2, num_workers=workers)
        batches.append(list(loader))
    assert len(batches[0]) == 4
    for a, b in zip(*batches):
        for k in a:
            assert torch.equal(a[k], b[k])
    assert batches[0][0]["position"].tolist() == list(range(30, 36))


def test_indivisible_global_batch_is_a_clear_error():
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        check_batch_geometry(16, 3)


def test_synthetic_images_in_range_and_varied():
    src = SyntheticSource(16, 100, seed=0)
    imgs = torch.stack([src.image(i) for i in range(20)])
    assert imgs.shape == (20, 3, 16, 16)
    assert imgs.min() >= -1 and imgs.max() <= 1
    assert imgs.std(dim=0).mean() > 0.1


def test_folder_source_reads_resizes_and_crops(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    src = FolderSource(str(tmp_path), 16, resize="resize")
    assert len(src) == 2
    a = src.image(0)
    assert a.shape == (3, 16, 16)
    assert a[0].mean() > 0.9 and a[2].mean() < -0.9


def _halves(path, size: tuple[int, int]) -> None:
    """An image whose left half is black and right half white."""
    from PIL import Image

    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    img.save(path)


def test_data_resize_is_a_choice_never_silent(tmp_path):
    """A 32x32 folder for a 16x16 model: refused by default, naming the image and both sizes;
    "resize" scales the whole picture down; "center-crop" cuts the middle out unscaled."""
    _halves(tmp_path / "a.png", (32, 32))
    with pytest.raises(UserError, match=r"a\.png\) is 32x32 pixels, and the model's input is 16x16") as e:
        FolderSource(str(tmp_path), 16)  # data.resize's default: refuse
    assert 'data.resize = "resize"' in str(e.value) and '"center-crop"' in str(e.value)
    scaled = FolderSource(str(tmp_path), 16, resize="resize").image(0)
    assert scaled[:, :, :7].max() < -0.9 and scaled[:, :, 9:].min() > 0.9  # both halves, 8 columns each
    cropped = FolderSource(str(tmp_path), 16, resize="center-crop").image(0)
    # The middle 16 of 32 columns, not scaled: 8 black, 8 white, without the scaling's soft edge.
    assert torch.equal(cropped[:, :, :8], torch.full((3, 16, 8), -1.0)) and torch.equal(cropped[:, :, 8:], torch.ones(3, 16, 8))
    assert not torch.equal(cropped, scaled)
    _halves(tmp_path / "a.png", (64, 32))
    cropped = FolderSource(str(tmp_path), 16, resize="center-crop").image(0)
    assert cropped[:, :, :8].max() < -0.9 and cropped[:, :, 8:].min() > 0.9  # columns 24..40 of 64
    _halves(tmp_path / "a.png", (12, 40))
    with pytest.raises(UserError, match="is 12x40 pixels, smaller than the 16x16"):
        FolderSource(str(tmp_path), 16, resize="center-crop")


def test_an_image_of_the_wrong_size_is_refused_even_when_bad_images_are_skipped(tmp_path):
    """A size is a setting to choose, not a damaged file: data.on_bad_image = "skip" does not
    hide it."""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (24, 24)).save(tmp_path / "b.png")
    source = FolderSource(str(tmp_path), 16, on_bad_image="skip")
    assert source.image(0).shape == (3, 16, 16)
    with pytest.raises(UserError, match="b.png\\) is 24x24"):
        source.image(1)
    assert source.bad_images == 0


def test_the_resize_choice_is_part_of_the_runs_math_and_older_runs_resized(tmp_path):
    from service.checkpoint.identity import differences, fingerprint

    base = ['data.kind="folder"', f'data.url="{tmp_path}"']
    saved = fingerprint(load_config(None, [*base, 'data.resize="resize"']))
    hard, _ = differences(saved, fingerprint(load_config(None, [*base, 'data.resize="center-crop"'])))
    assert [line.split(":")[0] for line in hard] == ["data.resize"]
    older = {k: v for k, v in saved.items() if k != "data.resize"}  # written before the setting
    assert differences(older, fingerprint(load_config(None, [*base, 'data.resize="resize"']))) == ([], [])
    hard, _ = differences(older, fingerprint(load_config(None, base)))  # today's default: refuse
    assert [line.split(":")[0] for line in hard] == ["data.resize"]


def test_folder_source_over_memory_fsspec():
    import io

    import fsspec
    from PIL import Image

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(buf, format="PNG")
    fs.pipe("/imgs/x/one.png", buf.getvalue())
    src = FolderSource("memory://imgs", 16)  # 16x16: no resize needed
    assert len(src) == 1 and src.image(0)[1].mean() > 0.9


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        FolderSource(str(tmp_path), 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot decode"):
        FolderSource(str(tmp_path), 16)


def test_digits_source():
    src = DigitsSource(16)
    assert len(src) == 1797
    assert src.image(0).shape == (3, 16, 16)


def test_build_source_from_config():
    from service.data.stream import build_source

    cfg = load_config(None, ["data.kind=\"digits\""])
    assert len(build_source(cfg)) == 1797


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_source_kind_in_the_registry_builds_and_describes_itself(kind, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    url = tmp_path
    if kind == "webdataset":  # the folder, packed
        from service.data.pack import pack_folder

        pack_folder(str(tmp_path), str(tmp_path / "shards"), shard_bytes=10**6)
        url = tmp_path / "shards"
    extra = [f'data.url="{url}"'] if SOURCES[kind].needs_url else []
    if kind == "digits":
        pytest.importorskip("sklearn")
    from service.data.stream import build_source

    cfg = load_config(None, [f'data.kind="{kind}"', "data.epoch_size=7", 'data.resize="resize"', *extra])
    source = build_source(cfg)
    assert len(source) > 0 and source.image(0).shape == (3, 16, 16)
    assert isinstance(source.describe(), str) and source.describe()
    for key in SOURCES[kind].math_keys:  # what the kind declares is part of the run's identity
        assert key in MATH_KEYS["data"]


def test_a_size_refusal_raised_in_a_loader_worker_is_one_line(tmp_path):
    """DataLoader re-raises a worker's error with a header and the worker's traceback in its
    text; the worker's log line keeps only the error's own message."""
    from PIL import Image

    from service.data.stream import TrainingSamples, build_loader
    from service.errors import user_message

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (24, 24)).save(tmp_path / "b.png")
    samples = TrainingSamples(FolderSource(str(tmp_path), 16), 0, 100, False)
    loader = build_loader(samples, start_position=0, num_steps=2, global_batch=2, rank=0, world_size=1,
                          num_workers=1)
    with pytest.raises(UserError) as e:
        list(loader)
    assert "Original Traceback" in str(e.value)  # what DataLoader makes of it
    line = user_message(e.value)
    assert "\n" not in line and line.startswith("data.url") and "is 24x24 pixels" in line, line


def test_resize_is_no_part_of_a_generated_data_runs_math_and_leaving_refuse_is_safe(tmp_path):
    from service.checkpoint.identity import differences, fingerprint

    shapes_before = {k: v for k, v in fingerprint(load_config(None, [])).items()}
    shapes_before.pop("data.resize", None)  # written before the setting existed
    assert "data.resize" not in fingerprint(load_config(None, []))  # shapes: no images to resize
    assert differences(shapes_before, fingerprint(load_config(None, ['data.resize="center-crop"']))) == ([], [])
    # Under "refuse" every image trained on had the model's size, which the other two keep as is.
    base = ['data.kind="folder"', f'data.url="{tmp_path}"']
    refused = fingerprint(load_config(None, base))
    hard, soft = differences(refused, fingerprint(load_config(None, [*base, 'data.resize="resize"'])))
    assert hard == [] and [line.split(":")[0] for line in soft] == ["data.resize"]
    hard, _ = differences(fingerprint(load_config(None, [*base, 'data.resize="center-crop"'])),
                          fingerprint(load_config(None, [*base, 'data.resize="resize"'])))
    assert [line.split(":")[0] for line in hard] == ["data.resize"]
