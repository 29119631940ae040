"""Recovery benchmark: time from an injected fault to the first completed step after resume
(MTTR) and the steps lost, per fault kind, for the supervised local job — and plain
`torchrun --max-restarts` restarting the same worker crash, measured in the same run.

Fault kinds: worker_crash (kill -9 of a worker), hang (SIGSTOP of a worker), lost_node
(kill -9 of one of two torchrun agents), preemption (SIGTERM to the supervisor; steps lost
only). Tiny preset, CPU, 2 ranks. Prints one JSON line.

Usage: python bench/recovery.py [--injections 2] [--hang-timeout 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import faults  # noqa: E402
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


def _wait(cond, proc: subprocess.Popen, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"job ended early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _measure(trace: Path, proc: subprocess.Popen, inject) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """MTTR = fault -> first step completed by a process that did not exist before the fault;
    steps lost = last step trained before the fault - the step the job resumed from."""
    before = {l["pid"] for l in _lines(trace)}
    t_fault = time.time()
    inject()
    _wait(lambda: any(l["pid"] not in before for l in _lines(trace)), proc)
    lines = _lines(trace)
    first = next(l for l in lines if l["pid"] not in before)
    last_before = max(l["step"] for l in lines if l["time"] <= t_fault)
    return {"mttr_s": first["time"] - t_fault, "steps_lost": max(0, last_before - (first["step"] - 1))}


def run_kind(kind: str, injections: int, hang_timeout: float, plain: bool = False) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix=f"recovery-{kind}-") as tmp:
        trace = Path(tmp) / "trace"
        trace.mkdir()
        overrides = COMMON + [f'checkpoint.url="{tmp}/ckpt"', "train.max_steps=100000",
                              f"supervisor.hang_timeout_s={hang_timeout}", "supervisor.heartbeat_interval_s=0.5",
                              "supervisor.port=0", "metrics.port=0"]
        sets = [a for o in overrides for a in ("--set", o)]
        nnodes, nproc = (2, 1) if kind == "lost_node" else (1, 2)
        if plain:
            from service.supervisor.launcher import free_port

            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=10",
                   "-m", "service.train", *sets]
        else:
            cmd = [sys.executable, "-m", "service.cli", "train", "--nnodes", str(nnodes),
                   "--nproc-per-node", str(nproc), *sets]
        env = {**os.environ, "FTDIFF_SAMPLE_TRACE": str(trace), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = []
        try:
            for _ in range(injections):
                # let the (re)started job train a few steps before the next fault
                _wait(lambda: sum(l["pid"] in set(_pids(trace).values()) for l in _lines(trace)) >= 10, proc)
                pids = _pids(trace)
                if kind == "worker_crash":
                    results.append(_measure(trace, proc, lambda: faults.kill9(pids[1])))
                elif kind == "hang":
                    results.append(_measure(trace, proc, lambda: faults.freeze(pids[1])))
                elif kind == "lost_node":
                    agents = procs.children(proc.pid)
                    results.append(_measure(trace, proc, lambda: faults.kill9(agents[-1])))
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


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(samples)}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[f"{key}_median"] = round(statistics.median(values), 2)
        out[f"{key}_max"] = round(max(values), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--injections", type=int, default=2)
    p.add_argument("--hang-timeout", type=float, default=5.0)
    p.add_argument("--kinds", default="worker_crash,hang,lost_node,preemption")
    args = p.parse_args()
    result: dict[str, object] = {"hang_timeout_s": args.hang_timeout, "checkpoint_every_steps": 5}
    for kind in args.kinds.split(","):
        result[kind] = summarize(run_kind(kind, args.injections, args.hang_timeout))
    plain = summarize(run_kind("worker_crash", args.injections, args.hang_timeout, plain=True))
    result["plain_torchrun_worker_crash"] = plain
    if "worker_crash" in result:
        ours = result["worker_crash"]["mttr_s_median"]  # type: ignore[index]
        result["worker_crash_mttr_vs_plain_torchrun"] = round(ours / plain["mttr_s_median"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
