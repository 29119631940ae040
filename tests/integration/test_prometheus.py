"""Alert rules under promtool, and a real Prometheus scraping a supervised job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from service import faults
from tests.helpers import REPO, free_port, stop, wait_for_port, worker_pids
from tests.helpers import SupervisedJob as Job

PROM_DIR = REPO / "deploy" / "prometheus"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run installs the Debian package prometheus")
        pytest.skip(f"{tool} not installed (apt-get install prometheus)")
    return path


@pytest.mark.timeout(60)
def test_promtool_checks_rules_and_runs_their_unit_tests():
    promtool = need("promtool")
    for args in (["check", "rules", "ftdiff.rules.yml"], ["test", "rules", "ftdiff.rules.test.yml"],
                 ["check", "config", "prometheus.local.yml"]):
        res = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=50)
        assert res.returncode == 0, res.stdout + res.stderr


def _known_metric_names() -> set[str]:
    from prometheus_client import CollectorRegistry

    from service.metrics import SupervisorMetrics, WorkerMetrics

    names = set()
    for registry in (WorkerMetrics(CollectorRegistry()).registry, SupervisorMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names |= {s.name for s in family.samples}
            if family.type == "counter":  # a labelled counter has no sample before its first child
                names.add(family.name + "_total")
    return names


def test_rules_and_dashboard_use_only_metrics_that_exist():
    known = _known_metric_names()
    texts = [(PROM_DIR / "ftdiff.rules.yml").read_text(),
             (REPO / "deploy" / "grafana" / "dashboards" / "ftdiff.json").read_text()]
    used = {m for text in texts for m in re.findall(r"ftdiff_[a-z_]+", text)}
    missing = sorted(u for u in used if u not in known)
    assert not missing, missing
    dash = json.loads(texts[1])
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Checkpoint age", "Commit timeline", "Save durations (p50 / p95)", "Restarts by reason",
                   "Heartbeat age per rank", "Throughput", "Loss"):
        assert needed in titles


def _wait_ready(port: int, timeout: float = 60) -> None:
    """Prometheus answers 503 until its storage is up; /-/ready says when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    raise TimeoutError("prometheus never became ready")


def _query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _wait_value(port: int, expr: str, ok, timeout: float = 90) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = _query(port, expr)
        if value is not None and ok(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} never satisfied the condition (last value {value})")


@pytest.mark.timeout(300)
def test_real_prometheus_scrapes_a_supervised_job(tmp_path):
    prometheus = need("prometheus")
    job = Job(tmp_path, ["train.max_steps=36", "checkpoint.every_steps=4", "train.step_sleep_s=0.25",
                         'run.name="scraped"'])
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ftdiff\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{job.metrics_port}']}}]\n"
    )
    prom = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(prom_port, 30)
        _wait_ready(prom_port)
        first = _wait_value(prom_port, "max(ftdiff_checkpoint_last_committed_step)", lambda v: v >= 4)
        _wait_value(prom_port, "max(ftdiff_checkpoint_last_committed_step)", lambda v: v > first)
        # Every series carries the run's name, relayed worker series included.
        for name in ("ftdiff_job_world_size", "ftdiff_checkpoint_last_committed_step", "ftdiff_train_step"):
            assert _query(prom_port, f'count({name}{{run!="scraped"}})') is None, name
            assert _query(prom_port, f'count({name}{{run="scraped"}})') >= 1, name
        assert _query(prom_port, 'sum(ftdiff_job_restarts_total{reason="worker_crash"})') == 0
        faults.kill9(worker_pids(job.trace)[1])
        _wait_value(prom_port, 'sum(ftdiff_job_restarts_total{reason="worker_crash"})', lambda v: v >= 1)
        assert _query(prom_port, 'max(ftdiff_job_state{ftdiff_job_state="running"})') == 1
        # and the restarted job commits again, seen through the same scrape
        # (right after the crash the dead ranks' series are gone, so the query may be empty)
        before = _query(prom_port, "max(ftdiff_checkpoint_last_committed_step)") or first
        _wait_value(prom_port, "max(ftdiff_checkpoint_last_committed_step)", lambda v: v > before)
    finally:
        stop(job.proc)
        stop(prom)
