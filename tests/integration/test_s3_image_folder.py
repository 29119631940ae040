"""An image folder on a real S3 server (SeaweedFS on loopback), read by DataLoader worker
processes: the same samples as without workers, and no asyncio noise from the clients they
inherit. (Exit codes of S3 mistakes: test_bad_storage.py.)"""

from __future__ import annotations

import io

import pytest
import torch

from service.errors import EXIT_OK
from tests.helpers import run, single_cmd


@pytest.mark.timeout(120)
def test_s3_folder_with_workers_gives_the_same_samples(s3_bucket):
    import s3fs
    from PIL import Image

    from service.data.folder import FolderSource
    from service.data.stream import TrainingSamples, build_loader

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for i in range(10):
        buf = io.BytesIO()
        Image.new("RGB", (12, 10), (20 * i, 255 - 20 * i, 7 * i)).save(buf, format="PNG")
        fs.pipe_file(f"{s3_bucket[5:]}/imgs/{i:02d}.png", buf.getvalue())
    fs.pipe_file(f"{s3_bucket[5:]}/imgs/05.png", b"not a png")  # one bad file, skipped
    src = FolderSource(f"{s3_bucket}/imgs", 8, on_bad_image="skip", resize="resize")  # lists + decodes here
    samples = TrainingSamples(src, seed=0, num_timesteps=100, hflip=True)
    batches = {}
    for workers in (0, 2):
        # A worker must not reuse the parent's s3fs client: "This class is not fork-safe".
        loader = build_loader(samples, start_position=3, num_steps=4, global_batch=4, rank=0,
                              world_size=1, num_workers=workers)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 4
    for a, b in zip(batches[0], batches[2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    flagged = torch.cat([b["bad_image"] for b in batches[2]])
    indices = torch.cat([b["source_index"] for b in batches[2]])
    assert torch.equal(flagged, indices == 5)


@pytest.mark.timeout(180)
def test_loader_workers_on_s3_leave_no_asyncio_noise(s3_bucket, s3_server, tmp_path):
    """A forked loader worker replaces the s3fs client it inherited; were that client collected
    there, its finalizer would close the parent's session from the worker's loop: "Task exception
    was never retrieved ... attached to a different loop" in every run (seen on SeaweedFS)."""
    import s3fs
    from PIL import Image

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (15 * i, 9 * i, 200 - 9 * i)).save(buf, format="PNG")
        fs.pipe_file(f"{s3_bucket[5:]}/set/{'ab'[i % 2]}/{i:02d}.png", buf.getvalue())
    res = run(single_cmd(["train.max_steps=6", 'data.kind="folder"', f'data.url="{s3_bucket}/set"',
                          "data.num_workers=2", f'checkpoint.url="{tmp_path / "ckpt"}"']), env=s3_server, timeout=150)
    assert res.returncode == EXIT_OK, res.stderr[-2000:]
    assert "Task exception" not in res.stderr and "different loop" not in res.stderr, res.stderr[-2000:]
