import socket
import threading

import torch
from prometheus_client import CollectorRegistry

from service.metrics import SupervisorMetrics, WorkerMetrics

UNITS = ("_seconds", "_bytes", "_total", "_step", "_loss", "_second", "_size", "_state", "_ratio",
         "_speed")  # ftdiff_rank_relative_speed: a ratio, named by issue 25's contract
# Subsystems; "recovery" and "steps" (ftdiff_recovery_seconds, ftdiff_steps_lost_total) are the
# names the recovery work was specified with; "rollbacks", "skipped", "replica" are issue 25's.
SUBSYSTEMS = ("checkpoint", "job", "worker", "train", "supervisor", "data", "recovery", "steps", "nonfinite", "rank",
              "rollbacks", "skipped", "replica")


def test_names_follow_the_convention():
    for registry in (WorkerMetrics(CollectorRegistry()).registry, SupervisorMetrics().registry):
        for family in registry.collect():
            if family.name.startswith("ftdiff_") is False:
                continue
            assert family.name.split("_")[1] in SUBSYSTEMS, family.name
            if family.type == "counter" and family.samples:  # a labelled one may have no child yet
                assert any(s.name.endswith("_total") for s in family.samples), family.name
            assert family.name.endswith(UNITS) or family.type in ("counter", "histogram", "stateset"), family.name


def test_required_metrics_exist():
    names = set()
    for registry in (WorkerMetrics(CollectorRegistry()).registry, SupervisorMetrics().registry):
        names |= {f.name for f in registry.collect()}
    for required in [
        "ftdiff_checkpoint_last_committed_step", "ftdiff_checkpoint_last_committed_timestamp_seconds",
        "ftdiff_checkpoint_save_duration_seconds", "ftdiff_checkpoint_load_duration_seconds",
        "ftdiff_checkpoint_bytes_written", "ftdiff_checkpoint_failures", "ftdiff_checkpoint_verify_failures",
        "ftdiff_checkpoint_saves_skipped", "ftdiff_job_restarts", "ftdiff_job_failures_detected",
        "ftdiff_job_world_size", "ftdiff_job_state", "ftdiff_worker_heartbeat_age_seconds",
        "ftdiff_train_step", "ftdiff_train_loss", "ftdiff_train_samples_per_second",
        "ftdiff_supervisor_rejected_requests", "ftdiff_data_wait_seconds", "ftdiff_data_wait_ratio",
        "ftdiff_nonfinite_steps", "ftdiff_rollbacks", "ftdiff_skipped_samples", "ftdiff_replica_mismatch",
    ]:
        assert required in names, required


def test_checkpoint_metrics_update_on_save_and_failure(tmp_path):
    from tests.helpers import CheckpointJob as Job

    job = Job(str(tmp_path))
    job.step()
    job.ckpt.save_at(1, 0, blocking=False)
    job.ckpt.before_update()
    assert job.ckpt.wait()
    m = job.metrics
    assert m.last_committed_step._value.get() == 1
    assert m.bytes_written._value.get() > 0
    samples = {s.name + str(s.labels): s.value for f in [m.save_duration.collect()[0]] for s in f.samples}
    assert samples["ftdiff_checkpoint_save_duration_seconds_count{'phase': 'stall'}"] == 1
    assert samples["ftdiff_checkpoint_save_duration_seconds_count{'phase': 'commit'}"] == 1


def test_training_step_does_no_network_io(monkeypatch, tmp_path):
    """With a supervisor configured, only the heartbeat thread touches the network."""
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.loop import Trainer

    connects: list[str] = []
    original = socket.socket.connect

    def spy(self, address):
        connects.append(threading.current_thread().name)
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    monkeypatch.setenv("FTDIFF_SUPERVISOR_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("FTDIFF_TOKEN", "t")
    cfg = load_config(None, ["train.max_steps=6", "train.global_batch_size=4", f'checkpoint.url="{tmp_path}"',
                             "logging.sample_every=0", "logging.tensorboard=false",
                             "checkpoint.every_steps=3", "supervisor.heartbeat_interval_s=0.05"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
    assert connects, "the heartbeat thread should have tried to connect"
    assert set(connects) == {"heartbeat"}, connects


def test_served_series_carry_the_run_label_and_the_registry_stays_plain():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import SupervisorMetrics, WorkerMetrics, metric_samples

    m = SupervisorMetrics(run="run-a")
    m.heartbeat_age.labels(rank="0").set(1.5)
    worker = WorkerMetrics()
    worker.train.step.set(7)
    m.relay.update(0, metric_samples(worker.registry))
    served = list(text_string_to_metric_families(generate_latest(m.exported).decode()))
    samples = [s for f in served for s in f.samples]
    assert samples and all(s.labels.get("run") == "run-a" for s in samples)
    assert {"ftdiff_train_step", "ftdiff_worker_heartbeat_age_seconds", "ftdiff_job_state"} <= {
        s.name for s in samples}
    assert m.registry.get_sample_value("ftdiff_worker_heartbeat_age_seconds", {"rank": "0"}) == 1.5
    plain = generate_latest(SupervisorMetrics().exported).decode()
    assert "run=" not in plain
