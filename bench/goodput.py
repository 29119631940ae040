"""Goodput benchmark: the share of wall time spent on useful training steps while a random
worker is killed with kill -9 every ``--period`` seconds for ``--minutes`` — the supervised local
job (pre-started workers, memory tier: the defaults of a production job) against plain
`torchrun --max-restarts` of the same worker reloading its last committed (DCP) checkpoint,
measured one after the other in the same run.

Each variant is the tiny preset on CPU, 2 ranks, ``train.step_sleep_s = 0`` (every step is real
work), a checkpoint every ``--every-steps`` steps, no preview grids and a ``train.max_steps`` it
never reaches. The
sample trace (``FTDIFF_SAMPLE_TRACE``: one JSON line per rank and step, with the process id)
gives every step's end time and the process that trained it.

- Window: starts when the first step is done (start-up is not counted) and lasts ``--minutes``;
  at its end the job gets SIGTERM and is waited for (what it does after the window is not
  counted).
- Fault-free step time ``T_ff``: the median time between two consecutive steps of one rank-0
  process from the window's start to the first kill (checkpoint stalls and restarts are badput,
  not part of T_ff).
- Kills: at window start + k × period (k = 1, 2, ...), kill -9 of a rank chosen by
  ``random.Random(--seed)``, by the pid of the process that traced its newest step. A job still
  recovering from the previous kill is waited for (``kill_delay_s``): only trained processes
  are killed. Only descendants of the job this bench started are ever signalled.
- Useful steps: distinct steps on the final training path = highest step done by the window's
  end - the step done at its start (steps trained twice count once).
  ``goodput = useful_steps × T_ff / window_s``.
- Per kill: MTTR = kill -> first step done by a process that did not exist before the kill;
  steps lost = newest step done before the kill - the step the restarted job resumed from
  (steps trained again).

Variants: ``ftdiff`` (``ftdiff train --nnodes 1 --nproc-per-node 2`` with
``supervisor.prestart_workers = true``, memory tier on), ``torchrun`` (plain ``torchrun
--max-restarts`` of ``-m service.train``, ``checkpoint.memory_tier = false``: every restart
reloads the last committed checkpoint), ``ftdiff-noprestart`` (supervised, workers started cold,
memory tier on). Prints one JSON line.

Usage: python bench/goodput.py [--minutes 10] [--period 60] [--every-steps 100] [--seed 0]
                               [--variants ftdiff,torchrun]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import faults
from service.supervisor import procs

REPO = Path(__file__).resolve().parents[1]
COMMON = ["train.global_batch_size=8", "data.epoch_size=64", "train.log_every=1000",
          "train.step_sleep_s=0", "train.max_steps=10000000",
          "logging.sample_every=0"]  # no preview grids: periodic work that is not training
VARIANTS = ("ftdiff", "torchrun", "ftdiff-noprestart")
RANKS = 2
POLL_S = 0.2
START_TIMEOUT_S = 300.0  # job start -> first step done
STOP_TIMEOUT_S = 90.0  # SIGTERM at the window's end -> the job is gone (then SIGKILL)


class Trace:
    """The sample trace, read incrementally (only the bytes appended since the last call):
    rank, step, time and pid of every step done, per process."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.offsets: dict[Path, int] = {}
        self.lines: list[dict] = []  # in the order read; sorted copies where order matters
        self.by_pid: dict[int, list[dict]] = {}

    def update(self) -> None:
        for f in self.dir.glob("rank*-pid*.jsonl"):
            start = self.offsets.get(f, 0)
            try:
                with f.open("rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # complete lines only; the rest comes next time
            self.offsets[f] = start + end
            for raw in data[:end].splitlines():
                if not raw.strip():
                    continue
                try:
                    body = json.loads(raw)
                except ValueError:
                    continue
                line = {"step": int(body["step"]), "rank": int(body["rank"]), "time": float(body["time"]),
                        "pid": int(body.get("pid") or f.stem.split("pid")[1])}
                self.lines.append(line)
                self.by_pid.setdefault(line["pid"], []).append(line)

    def newest_per_rank(self) -> dict[int, dict]:
        """Each rank's newest traced line (its pid: the process now training that rank)."""
        newest: dict[int, dict] = {}
        for line in self.lines:
            if line["rank"] not in newest or line["time"] > newest[line["rank"]]["time"]:
                newest[line["rank"]] = line
        return newest


def _command(variant: str, tmp: Path, shm: Path, every_steps: int, restarts: int) -> list[str]:
    overrides = COMMON + [f'checkpoint.url="{tmp}/ckpt"', f"checkpoint.every_steps={every_steps}",
                          f'checkpoint.memory_tier_dir="{shm}"', "supervisor.port=0", "metrics.port=0",
                          f"supervisor.max_restarts={restarts}"]
    if variant == "torchrun":
        overrides.append("checkpoint.memory_tier=false")
    if variant != "torchrun":
        overrides.append(f"supervisor.prestart_workers={'true' if variant == 'ftdiff' else 'false'}")
    sets = [a for o in overrides for a in ("--set", o)]
    if variant == "torchrun":
        from service.supervisor.torchrun import free_port

        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={RANKS}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                f"--max-restarts={restarts}", "-m", "service.train", "--log-format", "json", *sets]
    return [sys.executable, "-m", "service.cli", "train", "--nnodes", "1", "--nproc-per-node", str(RANKS),
            "--log-format", "json", *sets]


def _shm_dir() -> Path | None:
    """Where the memory tier's files go: a private folder in /dev/shm (RAM, as in production)."""
    return Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _start_ticks(pid: int) -> str:
    """A process's start time in clock ticks since boot ("" if gone): with the pid, its identity."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class Job:
    """One started job; ``stop()`` ends it and everything below it, whatever happened."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log = log
        with log.open("w") as sink:
            # Its own session: a Ctrl-C reaches this bench only, which then stops the job in order.
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=sink,
                                         start_new_session=True)
        self.seen: dict[int, str] = {}  # every descendant ever seen -> its start time (cleanup)

    def descendants(self) -> set[int]:
        found = set(procs.descendants(self.proc.pid)) if self.proc.poll() is None else set()
        for pid in found:
            self.seen.setdefault(pid, _start_ticks(pid))
        return found

    def stop(self) -> int | None:
        """SIGTERM (the supervisor commits an emergency checkpoint and exits 43; torchrun passes
        it on), SIGKILL after STOP_TIMEOUT_S; then SIGKILL whatever of ours is still alive."""
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.descendants()
                self.proc.kill()
                self.proc.wait(timeout=30)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its group: agents and workers left behind
        except (ProcessLookupError, PermissionError):
            pass
        for pid, ticks in self.seen.items():  # in sessions of their own (the warm process, its workers)
            if procs.pid_alive(pid) and ticks and _start_ticks(pid) == ticks:  # not a reused pid
                procs.kill(pid)
        return self.proc.returncode


def _measure(job: Job, trace: Trace, minutes: float, period: float, rng: random.Random) -> dict:
    proc = job.proc
    deadline = time.monotonic() + START_TIMEOUT_S
    while not trace.lines:
        if proc.poll() is not None:
            raise RuntimeError(f"job ended with {proc.returncode} before its first step")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no step done within {START_TIMEOUT_S:.0f} s of the start")
        if "crash loop" in job.log.read_text(errors="replace"):  # the supervisor backs off: no start
            raise RuntimeError("the job's workers fail at start (the supervisor reports a crash loop)")
        time.sleep(POLL_S)
        trace.update()
    first = min(trace.lines, key=lambda l: l["time"])
    t_start, step_start = first["time"], first["step"]
    t_end = t_start + minutes * 60
    kills: list[dict] = []  # {"time", "pid", "rank", "before": pids seen, "scheduled"}
    ended_early = None
    k = 1
    while time.time() < t_end:
        if proc.poll() is not None:
            ended_early = proc.returncode
            break
        due = t_start + k * period
        if due >= t_end:
            time.sleep(min(POLL_S, max(0.0, t_end - time.time())))
            continue
        if time.time() < due:
            time.sleep(min(POLL_S, due - time.time()))
            continue
        trace.update()
        last_kill = kills[-1]["time"] if kills else 0.0
        ours = job.descendants()
        live = {r: l for r, l in trace.newest_per_rank().items()
                if l["time"] > last_kill and l["pid"] in ours and procs.pid_alive(l["pid"])}
        if len(live) < RANKS:  # still recovering from the previous kill: kill trained processes only
            time.sleep(POLL_S)
            continue
        rank = rng.choice(sorted(live))
        victim = live[rank]["pid"]
        before = set(trace.by_pid)
        t_kill = time.time()
        faults.kill9(victim)
        kills.append({"time": t_kill, "pid": victim, "rank": rank, "before": before, "scheduled": due})
        k += 1
    trace.update()
    return _results(trace, t_start, step_start, t_end, kills, ended_early)


def _results(trace: Trace, t_start: float, step_start: int, t_end: float, kills: list[dict],
             ended_early: int | None) -> dict:
    window = [l for l in trace.lines if t_start <= l["time"] <= t_end]
    step_end = max(l["step"] for l in window)
    t_first_kill = kills[0]["time"] if kills else t_end
    # fault-free step time: consecutive steps of one rank-0 process before the first kill
    deltas = []
    for lines in trace.by_pid.values():
        mine = sorted((l for l in lines if l["rank"] == 0 and t_start <= l["time"] <= t_first_kill),
                      key=lambda l: l["step"])
        deltas += [b["time"] - a["time"] for a, b in itertools.pairwise(mine) if b["step"] == a["step"] + 1]
    if not deltas:
        raise RuntimeError("no two consecutive steps before the first kill: no fault-free step time")
    t_ff = statistics.median(deltas)
    ff_lines = [l for l in window if l["time"] <= t_first_kill]
    ff_span = max(l["time"] for l in ff_lines) - t_start
    ff_steps = max(l["step"] for l in ff_lines) - step_start
    per_kill = []
    for i, kill in enumerate(kills):
        horizon = kills[i + 1]["time"] if i + 1 < len(kills) else t_end
        new = sorted((l for l in window if l["pid"] not in kill["before"] and kill["time"] < l["time"] <= horizon),
                     key=lambda l: l["time"])
        done_before = [l["step"] for l in window if l["time"] <= kill["time"]]
        row = {"at_s": round(kill["time"] - t_start, 2), "rank": kill["rank"],
               "kill_delay_s": round(kill["time"] - kill["scheduled"], 2)}
        if new:
            row["mttr_s"] = round(new[0]["time"] - kill["time"], 3)
            row["resumed_at_step"] = new[0]["step"] - 1
            row["steps_lost"] = max(0, max(done_before, default=step_start) - row["resumed_at_step"])
        per_kill.append(row)
    recovered = [r for r in per_kill if "mttr_s" in r]
    useful = step_end - step_start
    window_s = t_end - t_start
    out: dict = {
        "window_s": round(window_s, 1), "step_at_start": step_start, "step_at_end": step_end,
        "useful_steps": useful, "t_ff_s": round(t_ff, 4),
        "fault_free_steps_per_s": round(ff_steps / ff_span, 3) if ff_span > 0 else None,
        "goodput": round(useful * t_ff / window_s, 4),
        "fault_free_goodput": round(ff_steps * t_ff / ff_span, 4) if ff_span > 0 else None,
        "kills": len(kills), "unrecovered_kills": len(kills) - len(recovered),
        "steps_lost": sum(r["steps_lost"] for r in recovered),
    }
    if recovered:
        mttr = [r["mttr_s"] for r in recovered]
        out.update(mttr_s_median=round(statistics.median(mttr), 2), mttr_s_max=round(max(mttr), 2),
                   mttr_s_total=round(sum(mttr), 2))
    if ended_early is not None:
        out["ended_early_exit_code"] = ended_early
    out["per_kill"] = per_kill
    return out


def run_variant(variant: str, minutes: float, period: float, every_steps: int, seed: int) -> dict:
    rng = random.Random(seed)  # the same sequence of ranks in every variant
    restarts = int(minutes * 60 / period) + 10
    shm_root = _shm_dir()
    with tempfile.TemporaryDirectory(prefix=f"goodput-{variant}-") as tmp_name:
        tmp = Path(tmp_name)
        trace_dir = tmp / "trace"
        trace_dir.mkdir()
        shm = Path(tempfile.mkdtemp(prefix="ftdiff-goodput-", dir=shm_root)) if shm_root else tmp / "shm"
        cmd = _command(variant, tmp, shm, every_steps, restarts)
        env = {**os.environ, "FTDIFF_SAMPLE_TRACE": str(trace_dir), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        log = tmp / "job.log"
        job = Job(cmd, env, log)
        try:
            result = _measure(job, Trace(trace_dir), minutes, period, rng)
        except BaseException:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            print(f"goodput: {variant} failed; last lines of its log:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            exit_code = job.stop()
            shutil.rmtree(shm, ignore_errors=True)
        result["exit_code"] = exit_code
        return result


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="window per variant")
    p.add_argument("--period", type=float, default=60.0, help="seconds between kills")
    p.add_argument("--every-steps", type=int, default=100,
                   help="checkpoint.every_steps (about 5 s of this tiny job: a realistic share of save time)")
    p.add_argument("--seed", type=int, default=0, help="which rank each kill hits")
    p.add_argument("--variants", default="ftdiff,torchrun", help=f"comma-separated, of {','.join(VARIANTS)}")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)  # like Ctrl-C: stop the running job, then leave
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.minutes <= 0 or args.period <= 0 or args.every_steps < 1:
        p.error("--minutes and --period must be > 0, --every-steps >= 1")
    result: dict[str, object] = {
        "machine": {"cpu_count": os.cpu_count(), "torch": metadata.version("torch"),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
        "params": {"minutes": args.minutes, "period_s": args.period, "checkpoint_every_steps": args.every_steps,
                   "seed": args.seed, "preset": "tiny", "device": "cpu", "ranks": RANKS, "step_sleep_s": 0,
                   "global_batch_size": 8, "overrides": COMMON},
    }
    for variant in variants:
        result[variant] = run_variant(variant, args.minutes, args.period, args.every_steps, args.seed)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]  # type: ignore[index]
    plain = result.get("torchrun")
    for variant in ("ftdiff", "ftdiff-noprestart"):
        ours = result.get(variant)
        if isinstance(ours, dict) and isinstance(plain, dict):
            key = variant.replace("-", "_")
            if plain["goodput"] > 0:
                result[f"goodput_{key}_vs_torchrun"] = round(ours["goodput"] / plain["goodput"], 3)
            if plain["useful_steps"] > 0:
                result[f"useful_steps_{key}_vs_torchrun"] = round(ours["useful_steps"] / plain["useful_steps"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
