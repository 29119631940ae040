from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import BASELINE_STEPS
from tests.seaweed import S3Endpoint, s3_endpoint


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A real S3 server (SeaweedFS on loopback, credentials enforced, no bucket created on the
    fly), or the external one that FTDIFF_TEST_S3_ENDPOINT names."""
    with s3_endpoint(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_server(s3: S3Endpoint) -> Iterator[dict[str, str]]:
    """The read-write identity's environment, also set in this process for in-process clients."""
    env = s3.env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: dict[str, str]) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import s3fs

    name = f"ftdiff-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """An uninterrupted 2-rank tiny run (12 steps, checkpoint every 4): the reference result."""
    from tests.helpers import losses, run, shared_once, torchrun_cmd, why

    def make(folder):  # type: ignore[no-untyped-def]
        res = run(torchrun_cmd([f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4",
                                f'checkpoint.url="{folder}"']))
        assert res.returncode == 0, why(res)
        return str(folder), losses(res.stderr)

    return shared_once(tmp_path_factory, "baseline", make)
