"""Recovery benchmark: time from an injected fault to the first completed step after resume
(MTTR) and the steps lost, per fault kind, for the supervised local job with and without
pre-started workers (`supervisor.prestart_workers`: a warm process forks each worker), and for
plain `torchrun --max-restarts` restarting the same worker crash (with
``checkpoint.memory_tier = false``: plain torchrun reloads the newest DCP commit;
``--plain-memory-tier`` keeps the tier), all measured in the same run.

Each MTTR is broken down from timestamps the processes leave anyway: torchrun's agent log
(run with LOGLEVEL=INFO), the new workers' start times (/proc), rank 0's "training steps" log
line and the sample trace. ``detect_s``: fault -> the agent (for a lost node: the supervisor)
acts on it; ``agent_start_s`` (lost node): -> the relaunched agents run; ``stop_s``: -> the
survivors are gone and the agent enters the next rendezvous; ``rendezvous_s``: -> it starts
the new worker group; ``spawn_s``: -> the first new worker process exists (with pre-started
workers: the shim started and the zygote forked); ``init_s``: -> rank 0 is ready to train
(imports, process group, model, resume); ``first_step_s``: -> the first step is done.

Fault kinds: worker_crash (kill -9 of a worker), hang (SIGSTOP of a worker), lost_node
(kill -9 of one of two torchrun agents), preemption (SIGTERM to the supervisor; steps lost
only). Tiny preset, CPU, 2 ranks. Prints one JSON line.

Usage: python bench/recovery.py [--injections 2] [--hang-timeout 5] [--kinds worker_crash,...]
                                [--prestart-kinds worker_crash,hang,lost_node] [--no-prestart]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import faults  # noqa: E402
from service.node.proc import started_at  # noqa: E402
from service.supervisor import procs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMON = ["train.global_batch_size=8", "data.epoch_size=64", "train.log_every=1000",
          "checkpoint.every_steps=5", "train.step_sleep_s=0.2"]


def _lines(trace: Path) -> list[dict]:
    """Every traced step, with the pid of the process that trained it, in time order."""
    out = []
    for f in trace.glob("*.jsonl"):
        pid = int(f.stem.split("pid")[1])
        out += [{**json.loads(l), "pid": pid} for l in f.read_text().splitlines() if l.strip()]
    return sorted(out, key=lambda l: l["time"])


def _pids(trace: Path) -> dict[int, int]:
    newest: dict[int, tuple[float, int]] = {}
    for f in trace.glob("rank*-pid*.jsonl"):
        rank, pid = int(f.name.split("-")[0][4:]), int(f.stem.split("pid")[1])
        if rank not in newest or f.stat().st_mtime > newest[rank][0]:
            newest[rank] = (f.stat().st_mtime, pid)
    return {r: p for r, (_, p) in newest.items()}


# torchrun's agent log: "I1127 07:58:03.104000 16401 path/api.py:715] [default] Starting worker group"
_AGENT_LINE = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+) \d+ \S+\] (.*)$")
_READY = "training steps "


def _log_events(log: Path) -> list[tuple[float, str]]:
    """(time, message) of the agents' lines and of the workers' JSON log lines."""
    events = []
    year = datetime.date.today().year
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                body = json.loads(line)
                events.append((float(body["time"]), str(body.get("msg", ""))))
            except (ValueError, KeyError, TypeError):
                continue
        elif m := _AGENT_LINE.match(line):
            month, day, clock, msg = m.groups()
            when = datetime.datetime.strptime(f"{year}-{month}-{day} {clock}", "%Y-%m-%d %H:%M:%S.%f")
            events.append((when.timestamp(), msg))  # the agent logs local time
    return sorted(events)


def _breakdown(log: Path, t_fault: float, new_pids: set[int], t_first: float) -> dict[str, float]:
    """Where the MTTR went (see the module docstring); keys whose marker is missing are left out."""
    events = [(t, msg) for t, msg in _log_events(log) if t >= t_fault - 0.01]

    def first(after: float | None, *needles: str) -> float | None:
        if after is None:
            return None
        return next((t for t, msg in events if t >= after and any(n in msg for n in needles)), None)

    detect = first(t_fault, "closing signal", "failed (exitcode", "Worker group FAILED",
                   "Stopping worker group", "torchrun agent exited with")
    # A lost node: the supervisor starts every agent afresh (a new rendezvous round).
    agents_up = first(detect, "Starting elastic_operator")
    starting = first(detect, "Starting worker group")
    if agents_up is not None and starting is not None and agents_up > starting:
        agents_up = None  # a later restart's agent, not this recovery's
    rdzv = first(agents_up or detect, "Rendezvous'ing worker group")
    starts = [s for s in (started_at(p) for p in new_pids) if s is not None]
    spawned = min(starts) if starts else None
    ready = first(spawned, _READY)
    marks = [("detect_s", t_fault, detect), ("agent_start_s", detect, agents_up),
             ("stop_s", agents_up or detect, rdzv), ("rendezvous_s", rdzv, starting),
             ("spawn_s", starting, spawned), ("init_s", spawned, ready), ("first_step_s", ready, t_first)]
    return {key: round(max(0.0, b - a), 3) for key, a, b in marks if a is not None and b is not None}


def _wait(cond, proc: subprocess.Popen, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"job ended early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _measure(trace: Path, proc: subprocess.Popen, inject, log: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """MTTR = fault -> first step completed by a process that did not exist before the fault;
    steps lost = last step trained before the fault - the step the job resumed from."""
    before = {l["pid"] for l in _lines(trace)}
    t_fault = time.time()
    inject()
    _wait(lambda: any(l["pid"] not in before for l in _lines(trace)), proc)
    lines = _lines(trace)
    first = next(l for l in lines if l["pid"] not in before)
    new_pids = {l["pid"] for l in lines if l["pid"] not in before}
    last_before = max(l["step"] for l in lines if l["time"] <= t_fault)
    return {"mttr_s": first["time"] - t_fault, "steps_lost": max(0, last_before - (first["step"] - 1)),
            **_breakdown(log, t_fault, new_pids, first["time"])}


def run_kind(kind: str, injections: int, hang_timeout: float, plain: bool = False,
             prestart: bool = False, plain_memory_tier: bool = False) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix=f"recovery-{kind}-") as tmp:
        trace = Path(tmp) / "trace"
        trace.mkdir()
        overrides = COMMON + [f'checkpoint.url="{tmp}/ckpt"', "train.max_steps=100000",
                              f"supervisor.hang_timeout_s={hang_timeout}", "supervisor.heartbeat_interval_s=0.5",
                              "supervisor.port=0", "metrics.port=0"]
        overrides.append(f"supervisor.prestart_workers={'true' if prestart else 'false'}")
        if plain and not plain_memory_tier:  # plain torchrun as it comes: a DCP reload of the newest commit
            overrides.append("checkpoint.memory_tier=false")
        sets = [a for o in overrides for a in ("--set", o)]
        nnodes, nproc = (2, 1) if kind == "lost_node" else (1, 2)
        if plain:
            from service.supervisor.torchrun import free_port

            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=10",
                   "-m", "service.train", "--log-format", "json", *sets]
        else:
            cmd = [sys.executable, "-m", "service.cli", "train", "--nnodes", str(nnodes),
                   "--nproc-per-node", str(nproc), "--log-format", "json", *sets]
        # LOGLEVEL=INFO: the agents log their restart steps (the breakdown's markers).
        env = {**os.environ, "FTDIFF_SAMPLE_TRACE": str(trace), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "INFO"}
        log = Path(tmp) / "job.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=sink)
        results = []
        try:
            for _ in range(injections):
                # Let the (re)started job train and commit before the next fault: faults always
                # landing before a commit would run into the crash-loop backoff instead.
                _wait(lambda: sum(l["pid"] in set(_pids(trace).values()) for l in _lines(trace)) >= 24, proc)
                pids = _pids(trace)
                if kind == "worker_crash":
                    results.append(_measure(trace, proc, lambda p=pids[1]: faults.kill9(p), log))
                elif kind == "hang":
                    results.append(_measure(trace, proc, lambda p=pids[1]: faults.freeze(p), log))
                elif kind == "lost_node":
                    agents = [p for p in procs.children(proc.pid) if _is_agent(p)]
                    results.append(_measure(trace, proc, lambda p=agents[-1]: faults.kill9(p), log))
            if kind == "preemption":
                _wait(lambda: len(_lines(trace)) >= 8, proc)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
                from service.checkpoint.catalog import Catalog
                from service.checkpoint.storage import open_storage

                last = max(l["step"] for l in _lines(trace))
                committed = Catalog(open_storage(f"{tmp}/ckpt")).latest()[0]
                results.append({"steps_lost": last - committed, "exit_code": proc.returncode})
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        return results


def _is_agent(pid: int) -> bool:
    """A torchrun agent (the supervisor's other children are warm processes)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"torch.distributed.run" in cmdline or b"service.node.agent" in cmdline


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(samples)}
    for key in dict.fromkeys(k for s in samples for k in s):
        values = [s[key] for s in samples if key in s]
        out[f"{key}_median"] = round(statistics.median(values), 2)
        out[f"{key}_max"] = round(max(values), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--injections", type=int, default=2)
    p.add_argument("--hang-timeout", type=float, default=5.0)
    p.add_argument("--kinds", default="worker_crash,hang,lost_node,preemption")
    p.add_argument("--no-prestart", action="store_true", help="skip the runs with pre-started workers")
    p.add_argument("--prestart-kinds", default="worker_crash,hang,lost_node",
                   help="kinds also run with supervisor.prestart_workers = true (JSON: <kind>_prestart)")
    p.add_argument("--plain-memory-tier", action="store_true",
                   help="give the plain torchrun baseline our memory tier too (default: off, a DCP reload)")
    args = p.parse_args()
    result: dict[str, object] = {"hang_timeout_s": args.hang_timeout, "checkpoint_every_steps": 5}
    for kind in args.kinds.split(","):
        result[kind] = summarize(run_kind(kind, args.injections, args.hang_timeout))
    plain = summarize(run_kind("worker_crash", args.injections, args.hang_timeout, plain=True,
                               plain_memory_tier=args.plain_memory_tier))
    result["plain_torchrun_worker_crash"] = plain
    if "worker_crash" in result:
        ours = result["worker_crash"]["mttr_s_median"]  # type: ignore[index]
        result["worker_crash_mttr_vs_plain_torchrun"] = round(ours / plain["mttr_s_median"], 3)
    for kind in [] if args.no_prestart else args.prestart_kinds.split(","):
        warm = summarize(run_kind(kind, args.injections, args.hang_timeout, prestart=True))
        result[f"{kind}_prestart"] = warm
        if kind != "worker_crash":
            continue
        ratio = warm["mttr_s_median"] / plain["mttr_s_median"]
        result["worker_crash_prestart_mttr_vs_plain_torchrun"] = round(ratio, 3)
        if "worker_crash" in result:
            off = result["worker_crash"]["mttr_s_median"]  # type: ignore[index]
            result["worker_crash_prestart_mttr_vs_off"] = round(warm["mttr_s_median"] / off, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
