"""Image folders: every PNG mode to the right RGB, bad files named or skipped deterministically,
one filesystem per DataLoader worker process."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from service.data.folder import BadImageError, FolderSource
from service.data.stream import TrainingSamples, build_loader
from service.errors import UserError


def _pixel(src: FolderSource, index: int) -> list[float]:
    """The centre pixel of a decoded image, back in 0..255."""
    img = src.image(index)
    return [round(float(v)) for v in (img[:, 4, 4] + 1.0) * 127.5]


@pytest.mark.timeout(30)
def test_sixteen_bit_palette_and_alpha_convert_correctly(tmp_path):
    from PIL import Image

    grey16 = np.full((8, 8), 40000, np.uint16)  # 40000 >> 8 = 156; convert("RGB") would give 255
    Image.fromarray(grey16).save(tmp_path / "a_grey16.png")
    assert Image.open(tmp_path / "a_grey16.png").mode == "I;16"
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "b_dark16.png")  # 1000 >> 8 = 3
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30])
    pal.save(tmp_path / "c_palette.png")
    clear = Image.new("P", (8, 8), 0)
    clear.putpalette([255, 0, 0, 0, 0, 255])
    clear.save(tmp_path / "d_palette_transparent.png", transparency=0)  # red, fully transparent
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "e_rgba_half.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "f_rgba_clear.png")  # black, transparent
    Image.new("LA", (8, 8), (0, 255)).save(tmp_path / "g_la_opaque.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "h_la_clear.png")

    src = FolderSource(str(tmp_path), 8)
    got = {os.path.basename(src.files[i]): _pixel(src, i) for i in range(len(src))}
    assert got == {
        "a_grey16.png": [156, 156, 156],
        "b_dark16.png": [3, 3, 3],
        "c_palette.png": [10, 200, 30],
        "d_palette_transparent.png": [255, 255, 255],  # composited on white, not its red
        "e_rgba_half.png": [255, 127, 127],
        "f_rgba_clear.png": [255, 255, 255],
        "g_la_opaque.png": [0, 0, 0],
        "h_la_clear.png": [255, 255, 255],
    }


def _folder(tmp_path, bad: set[int], n: int = 6):
    """n solid-colour PNGs (red channel = 10 * index); the indices in ``bad`` are garbage."""
    from PIL import Image

    for i in range(n):
        path = tmp_path / f"img{i:02d}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        else:
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(path)
    return str(tmp_path)


@pytest.mark.timeout(30)
def test_bad_image_error_names_file_url_and_index(tmp_path):
    src = FolderSource(_folder(tmp_path, bad={3}), 8)  # start-up checks only the first file
    with pytest.raises(BadImageError) as e:
        src.image(3)
    msg = str(e.value)
    assert "image #3" in msg and str(tmp_path / "img03.png") in msg and "BytesIO" not in msg
    assert 'data.on_bad_image = "skip"' in msg
    assert isinstance(e.value, UserError)  # a clear message and exit code 2, not a traceback


@pytest.mark.timeout(30)
def test_skip_replaces_deterministically_and_counts(tmp_path):
    url = _folder(tmp_path, bad={0, 3, 5})
    src = FolderSource(url, 8, on_bad_image="skip")
    assert src.bad_images == 0  # the start-up check is not a served sample
    red = [round(float(src.image(i)[0, 0, 0] + 1) * 127.5) for i in range(6)]
    # bad -> next decodable file in folder order, wrapping (5 -> 0 is bad too -> 1)
    assert red == [10, 10, 20, 40, 40, 10]
    assert src.bad_images == 3
    again = FolderSource(url, 8, on_bad_image="skip")  # another process, another restart
    assert all(torch.equal(again.image(i), src.image(i)) for i in range(6))
    # The flag travels with each sample, so the training process can count what workers saw.
    samples = TrainingSamples(src, seed=0, num_timesteps=10, hflip=False)
    flags = {int(samples[p]["source_index"]): bool(samples[p]["bad_image"]) for p in range(6)}
    assert flags == {0: True, 1: False, 2: False, 3: True, 4: False, 5: True}


@pytest.mark.timeout(30)
def test_all_bad_and_start_up_failures_are_clear(tmp_path):
    url = _folder(tmp_path, bad={0, 1}, n=2)
    with pytest.raises(UserError, match="cannot decode image #0"):
        FolderSource(url, 8)
    with pytest.raises(UserError, match="cannot decode any of its 2 images"):
        FolderSource(url, 8, on_bad_image="skip")
    with pytest.raises(UserError, match="does not exist"):
        FolderSource(str(tmp_path / "missing"), 8)


@pytest.mark.timeout(30)
def test_read_errors_are_not_skipped(tmp_path):
    src = FolderSource(_folder(tmp_path, bad=set()), 8, on_bad_image="skip")
    os.remove(src.files[2])  # the storage lost it: skipping would make the stream depend on luck
    with pytest.raises(OSError, match=r"data file #2 .*img02.png.* cannot be read"):
        src.image(2)
    assert src.bad_images == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_each_process_opens_its_own_filesystem(tmp_path):
    src = FolderSource(_folder(tmp_path, bad={2}), 8, on_bad_image="skip")
    parent_fs = src.fs
    assert src.fs is parent_fs  # cached within a process
    state = src.__getstate__()
    assert state["_fs"] is None  # a spawned worker never unpickles a client
    samples = TrainingSamples(src, seed=1, num_timesteps=10, hflip=True)
    batches = []
    for workers in (0, 2):
        loader = build_loader(samples, start_position=0, num_steps=3, global_batch=4, rank=0,
                              world_size=1, num_workers=workers)
        batches.append(list(loader))
    for a, b in zip(*batches):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(int(b["bad_image"].sum()) for b in batches[1]) >= 1
