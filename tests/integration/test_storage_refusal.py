"""A store that starts refusing mid-run: credentials revoked, a policy changed, the bucket
deleted. Restarts cannot cure that (a job that only restarted did so 38 times in 200 s and never
gave up): a refusal that outlasts checkpoint.storage_retry_s ends the job with exit code 3, while
a store that fails only for a moment (5xx, timeouts) is waited out. Real SeaweedFS behind tests/http_proxy.py, which
answers every request with the injected S3 error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.checkpoint.storage_health import storage_verdict, wait_until_reachable
from service.errors import EXIT_OK, EXIT_STORAGE, StorageError
from tests.helpers import REPO, TINY, base_env, free_port, set_args
from tests.http_proxy import s3_http_proxy

DENIED = (403, "AccessDenied")
NO_BUCKET = (404, "NoSuchBucket")


class FakeClock:
    def __init__(self) -> None:
        self.t, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


@pytest.fixture
def proxied(s3, s3_bucket, monkeypatch):  # type: ignore[no-untyped-def]
    """(root URL through the proxy, the proxy's control), the environment pointed at it."""
    with s3_http_proxy(s3.url) as (url, control):
        for k, v in {**s3.env(), "AWS_ENDPOINT_URL": url}.items():
            monkeypatch.setenv(k, v)
        yield f"{s3_bucket}/run", control


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure", [DENIED, NO_BUCKET], ids=["denied", "no-bucket"])
def test_a_refusing_store_is_probed_backed_off_then_named(proxied, failure):
    url, control = proxied
    control.fail_with = failure
    clock = FakeClock()
    reason = storage_verdict(open_storage(url), False, 10.0, sleep=clock.sleep, clock=clock)
    assert reason is not None and "kept refusing 10 s after" in reason and url in reason
    assert clock.sleeps == [1.0, 2.0, 4.0, 3.0]  # backed off, the last wait cut to end at 10 s


@pytest.mark.timeout(60)
def test_a_stop_signal_ends_the_probing_at_once(proxied):
    """A preempted job must not sit out storage_retry_s (its grace period is shorter)."""
    import threading

    url, control = proxied
    control.fail_with = DENIED
    stop, clock = threading.Event(), FakeClock()

    def sleep(s: float) -> None:
        clock.sleep(s)
        stop.set()  # SIGTERM arrives during the first wait

    reason = storage_verdict(open_storage(url), False, 300.0, stop=stop, sleep=sleep, clock=clock)
    assert reason is not None and "a stop signal came 1 s after" in reason and clock.sleeps == [1.0]


@pytest.mark.timeout(60)
def test_a_store_that_heals_during_the_probes_lets_training_go_on(proxied):
    url, control = proxied
    control.fail_with = DENIED
    clock = FakeClock()

    def sleep(s: float) -> None:
        clock.sleep(s)
        control.fail_with = None  # access restored while waiting

    assert storage_verdict(open_storage(url), False, 30.0, sleep=sleep, clock=clock) is None
    assert clock.sleeps == [1.0]


@pytest.mark.parametrize("code,status,permanent", [
    ("SlowDown", 503, False), ("InternalError", 500, False), ("RequestTimeout", 400, False),
    ("AccessDenied", 403, True), ("InvalidAccessKeyId", 403, True), ("ExpiredToken", 400, True),
])
def test_throttling_and_5xx_are_transient_denials_are_not(code, status, permanent):
    """As s3fs raises them (after its own retries): the kinds a failed probe is told apart by."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from service.checkpoint.storage_check import _unusable

    error = translate_boto_error(ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))
    assert _unusable(open_storage("s3://some-bucket/run"), error, "write").permanent is permanent


@pytest.mark.timeout(120)
def test_an_unreachable_store_is_transient_and_waited_out_at_start_up(s3_server):
    dead = open_storage("s3://some-bucket/run", endpoint_url=f"http://127.0.0.1:{free_port()}")
    clock = FakeClock()
    assert storage_verdict(dead, False, 30.0, sleep=clock.sleep, clock=clock) is None  # training goes on
    with pytest.raises(StorageError, match="unreachable") as failed:
        wait_until_reachable(dead, False, 5.0, sleep=clock.sleep, clock=clock)
    assert not failed.value.permanent and clock.sleeps == [1.0, 2.0, 2.0]


@pytest.mark.timeout(240)
def test_access_denied_mid_run_ends_the_job_with_exit_3_and_a_later_start_resumes(proxied, s3_server):
    url, control = proxied
    def committed() -> list[int]:  # read around the proxy, from the server itself
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = s3_server["AWS_ENDPOINT_URL"]
        try:
            return Catalog(open_storage(url)).committed_steps()
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved

    overrides = [*TINY, "train.max_steps=60", "train.step_sleep_s=0.2", "checkpoint.every_steps=5",
                 "checkpoint.storage_retry_s=3", f'checkpoint.url="{url}"', "supervisor.port=0", "metrics.port=0"]
    cmd = [sys.executable, "-m", "service.cli", "train", *set_args(overrides)]
    proc = subprocess.Popen(cmd, env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not committed() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
        before = committed()
        assert before, "no commit before the store was made to refuse"
        control.fail_with = DENIED
        denied_at = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == EXIT_STORAGE, err[-3000:]
    assert time.monotonic() - denied_at < 90
    assert re.search(r"kept refusing \d+ s after", err) and "AccessDenied" in err
    assert "relaunching every agent" not in err and "giving up after" not in err  # never relaunched
    assert committed()[-1] >= before[-1]  # nothing committed was lost
    # Access restored: the next start resumes from the last commit and finishes.
    control.fail_with = None
    res = subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=200)
    assert res.returncode == EXIT_OK, res.stderr[-3000:]
    assert committed()[-1] == 60


@pytest.mark.timeout(120)
def test_deletes_refused_for_good_stop_the_job_at_its_next_save(proxied):
    """Retention that cannot delete would keep every checkpoint and grow the bucket without
    bound: the store is probed (the probe deletes too) and the next save stops the job."""
    from tests.helpers import CheckpointJob as Job

    url, control = proxied
    job = Job(url, "checkpoint.keep_last=2", "checkpoint.async=false", "checkpoint.storage_retry_s=1")
    job.ckpt.resume()
    for _ in range(2):
        job.step()
        assert job.ckpt.save_at(job.train.step, 0, blocking=True)
    control.fail_with, control.fail_methods = DENIED, frozenset({"DELETE", "POST"})  # POST: bulk delete
    with pytest.raises(StorageError, match="delete access denied.*kept refusing"):
        for step in (3, 4):  # the save itself, or retention after it, meets the refusal
            job.step()
            job.ckpt.save_at(step, 0, blocking=True)
            job.ckpt.drain()
    control.fail_with = None
    assert Catalog(open_storage(url)).committed_steps()[-1] >= 2  # nothing committed was lost


@pytest.mark.timeout(120)
def test_no_credentials_at_all_names_the_aws_credential_chain(s3_server, s3_bucket, tmp_path):
    """No key, no profile, no file, no metadata service: exit 3, and the message says where
    credentials are looked for instead of blaming the endpoint."""
    env = {k: v for k, v in base_env().items() if not k.startswith("AWS_")}
    env.update({"AWS_ENDPOINT_URL": s3_server["AWS_ENDPOINT_URL"], "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)})
    res = subprocess.run([sys.executable, "-m", "service.cli", "train", "--dry-run", "--nproc-per-node", "1",
                          "--set", f'checkpoint.url="{s3_bucket}/nocreds"'],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert res.returncode == EXIT_STORAGE, res.stderr[-2000:]
    assert "AWS credential chain" in res.stderr and "AWS_ACCESS_KEY_ID" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
