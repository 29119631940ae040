"""Shared helpers for tests: real torchrun jobs, a moto S3 server (where an unsigned store is
needed), checkpoint weights, the CLI and the supervisor's test doubles."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

if TYPE_CHECKING:
    from service.heartbeat import Heartbeat

REPO = Path(__file__).resolve().parents[1]
# Steps of the session-wide uninterrupted baseline run (conftest.py) that fault tests compare with.
BASELINE_STEPS = 12

# Keep the tiny jobs quick and quiet: one CPU thread per worker, small batches.
TINY = [
    "train.global_batch_size=8",
    "train.log_every=1",
    "train.warmup_steps=2",
    "data.epoch_size=64",
    # No sample grids or event files: tests of those turn them on themselves.
    "logging.sample_every=0",
    "logging.tensorboard=false",
    # The default lr (5e-3, tuned for the 500-step demo) lets Adam amplify float reduction-order
    # differences past the world-size comparison's tolerance within a few steps.
    "train.lr=2e-4",
]


@dataclass
class TracedRun:
    """Where a test job writes: its sample trace (FTDIFF_SAMPLE_TRACE) and its checkpoints."""

    trace: Path
    url: Path

    @property
    def env(self) -> dict[str, str]:
        return {"FTDIFF_SAMPLE_TRACE": str(self.trace)}

    @property
    def url_arg(self) -> str:
        return f'checkpoint.url="{self.url}"'


def traced_run(tmp: Path) -> TracedRun:
    run = TracedRun(tmp / "trace", tmp / "ckpt")
    run.trace.mkdir(parents=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_args(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def torchrun_cmd(overrides: list[str], nproc: int = 2, max_restarts: int = 0,
                 launcher: str = "torch.distributed.run") -> list[str]:
    """A plain torchrun job (``launcher``: or the agent wrapper, ``service.node.agent``)."""
    return [
        sys.executable, "-m", launcher,
        "--nnodes=1", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--max-restarts={max_restarts}",
        "-m", "service.train", "--log-format", "json", *set_args(TINY + overrides),
    ]


def single_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "service.train", "--log-format", "json", *set_args(TINY + overrides)]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=base_env(env), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def why(res: subprocess.CompletedProcess) -> str:
    """The lines of a failed run worth reading (errors first), then its tail."""
    keys = ("Error", "error", "terminate", "what():", "Fatal", "Traceback", "exitcode")
    important = [l for l in res.stderr.splitlines() if any(k in l for k in keys)][-40:]
    return "\n".join(important) + "\n--- tail ---\n" + res.stderr[-2000:]


def losses(stderr: str) -> dict[int, float]:
    """step -> global loss, from the JSON log lines of rank 0."""
    out: dict[int, float] = {}
    for line in stderr.splitlines():
        if line.startswith("{") and '"loss"' in line:
            body = json.loads(line)
            out[int(body["step"])] = float(body["loss"])
    return out


def weights(url: str, which: str = "model", env: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    from service.checkpoint.refs import resolve
    from service.weights import load_weights

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return load_weights(resolve(url), which)[1]  # type: ignore[arg-type]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """End a process this test started (by pid, never by name)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def stop_tree(proc: subprocess.Popen, timeout: float = 10) -> None:
    """``stop``, then SIGKILL whatever of its process tree outlived it: a worker cut off from its
    peers can sit in a collective for minutes after its agent is gone."""
    from service.node.proc import descendants, pid_alive

    below = descendants(proc.pid)
    stop(proc, timeout)
    for pid in below:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def popen(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a job in the background; ``finish`` collects its stderr. The output goes to
    unlinked temporary files, not pipes: nobody reads a pipe while the job runs, and a full
    one would block the job (and every worker writing to it) in the middle of a test."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=base_env(env), cwd=REPO, stdout=out, stderr=err, text=True)
    proc.err_file = err  # type: ignore[attr-defined]
    proc.out_file = out  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    """(exit code, stderr) of a job from ``popen``, once it ended."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    proc.err_file.seek(0)  # type: ignore[attr-defined]
    return proc.returncode, proc.err_file.read()  # type: ignore[attr-defined]


def trace_lines(trace_dir: Path) -> list[dict]:
    lines = []
    for f in sorted(Path(trace_dir).glob("*.jsonl")):
        lines += [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    return lines


def wait_for_step(trace_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """Block until some rank traced ``step`` (or later); returns that trace line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in trace_lines(trace_dir):
            if line["step"] >= step:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def worker_pids(trace_dir: Path) -> dict[int, int]:
    """rank -> pid of the newest worker process of that rank (from trace file names)."""
    pids: dict[int, tuple[float, int]] = {}
    for f in Path(trace_dir).glob("rank*-pid*.jsonl"):
        rank = int(f.name.split("-")[0][4:])
        pid = int(f.stem.split("pid")[1])
        mtime = f.stat().st_mtime
        if rank not in pids or mtime > pids[rank][0]:
            pids[rank] = (mtime, pid)
    return {r: p for r, (_, p) in pids.items()}


def committed_positions(trace: list[dict], final_step: int) -> list[int]:
    """Positions of the steps that count: for each step, the last attempt that trained it."""
    by_step: dict[int, dict[int, list[int]]] = {}
    for line in trace:
        by_step.setdefault(line["step"], {})[line["rank"]] = line["positions"]
    out: list[int] = []
    for step in range(1, final_step + 1):
        for rank in sorted(by_step[step]):
            out += by_step[step][rank]
    return out


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def ftdiff_inprocess(*args: str) -> CliResult:
    """The real `ftdiff` CLI, called in this process (skips a 5 s interpreter start-up)."""
    import contextlib
    import io

    from service.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


# The installed console script, next to this interpreter.
FTDIFF = str(Path(sys.executable).with_name("ftdiff"))


def ftdiff_subprocess(*args: str, env: dict[str, str] | None = None, timeout: float = 100,
                      entry: tuple[str, ...] = (FTDIFF,)) -> subprocess.CompletedProcess:
    """The real `ftdiff` CLI in a child process, for what only a fresh interpreter shows (a torch
    that does not import, the entry points themselves). ``env`` is added to this process's
    environment; ``entry`` is the command that starts the CLI (default: the console script)."""
    return subprocess.run([*entry, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


def metric_sum(exposition: str, selector: str) -> float:
    """Sum of the samples in a /metrics text that match ``name`` or ``name{k="v",...}`` (the
    given labels, any others too: served series also carry ``run``)."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, rest = selector.partition("{")
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return sum(s.value for family in text_string_to_metric_families(exposition) for s in family.samples
               if s.name == name and wanted.items() <= s.labels.items())


# Supervised local jobs (`ftdiff train`) in tests: short hang timeout and heartbeat interval.
HANG_TIMEOUT = 4.0
INTERVAL = 0.5


class SupervisedJob:
    """A supervised job: `ftdiff train` in a subprocess, with its trace and metrics endpoint.
    Its output goes to files beside the trace, never to pipes: nothing reads a pipe while the
    job runs, and a full one would block the supervisor and every worker writing to it."""

    def __init__(self, tmp: Path, overrides: list[str], nnodes: int = 1, nproc: int = 2,
                 env: dict[str, str] | None = None, own_group: bool = False):
        """``own_group``: in a process group of its own, as a shell's foreground job is (Ctrl-C
        there signals the whole group: ``os.killpg(job.proc.pid, SIGINT)``)."""
        dirs = traced_run(tmp)
        self.trace, self.url = dirs.trace, str(dirs.url)
        self.metrics_port = free_port()
        args = TINY + [
            dirs.url_arg, "supervisor.port=0", f"metrics.port={self.metrics_port}",
            f"supervisor.hang_timeout_s={HANG_TIMEOUT}", f"supervisor.heartbeat_interval_s={INTERVAL}",
            *overrides,
        ]
        cmd = [sys.executable, "-m", "service.cli", "train", "--nnodes", str(nnodes),
               "--nproc-per-node", str(nproc), "--log-format", "json", *set_args(args)]
        self.log_path = self.trace.parent / "supervisor.log"
        with open(self.log_path, "w") as err, open(self.trace.parent / "supervisor.out", "w") as out:
            self.proc = subprocess.Popen(cmd, env=base_env({**dirs.env, **(env or {})}),
                                         cwd=REPO, stdout=out, stderr=err, text=True,
                                         process_group=0 if own_group else None)

    def log(self) -> str:
        """Everything the job wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def fail(self, why: str) -> NoReturn:
        """Stop the job and fail the test with the end of its log."""
        stop(self.proc)
        raise AssertionError(f"{why}; supervisor log (all of it in {self.log_path}):\n{self.log()[-6000:]}")

    def wait_step(self, step: int) -> None:
        try:
            wait_for_step(self.trace, step, self.proc)
        except TimeoutError as e:
            self.fail(str(e))

    def metric(self, name: str) -> float:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited ({self.proc.returncode}): {self.log()[-3000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return metric_sum(text, name)

    def finish(self, timeout: float = 200) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            raise
        return self.proc.returncode, self.log()


class CheckpointJob:
    """A minimal registry (model, optimizer, counters) around a Checkpointer."""

    def __init__(self, url: str, *overrides: str, seed: int = 0, run_id: str | None = None,
                 restart_count: int = 0):
        from prometheus_client import CollectorRegistry

        from service.checkpoint.manager import Checkpointer
        from service.config import load_config
        from service.dist import DistInfo
        from service.metrics import CheckpointMetrics
        from service.train.state import ModelState, OptimizerState, TrainState

        self.cfg = load_config(None, [f'checkpoint.url="{url}"', "checkpoint.every_steps=1", *overrides])
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(8, 8)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.train = TrainState()
        registry = {"model": ModelState(self.model), "optimizer": OptimizerState(self.model, self.opt),
                    "train_state": self.train}
        self.metrics = CheckpointMetrics(CollectorRegistry())
        info = DistInfo(0, 1, 0, torch.device("cpu"), "0", run_id, restart_count)
        self.ckpt = Checkpointer(self.cfg, info, registry, self.metrics, per_rank_keys=(),
                                 can_read_state=lambda: bool(self.opt.state))

    def step(self) -> None:
        loss = self.model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.train.step += 1

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def committed_root(url: str, steps: int, *, samples_per_step: int = 4, keep_last: int | None = 10) -> str:
    """Write a local root with committed steps 1..``steps`` (a small model, in this process, saved
    synchronously) and return ``url``. Step n records ``n * samples_per_step`` samples seen;
    ``keep_last=None`` leaves the configured retention."""
    overrides = ["checkpoint.async=false"]
    if keep_last is not None:
        overrides.append(f"checkpoint.keep_last={keep_last}")
    job = CheckpointJob(url, *overrides)
    for _ in range(steps):
        job.step()
        job.ckpt.save(job.train.step, job.train.step * samples_per_step)
    job.ckpt.wait()
    job.ckpt.close()
    return url


def shard_name(catalog, step: int) -> str:  # type: ignore[no-untyped-def]
    """The first shard file of a committed step (names carry the writer's incarnation)."""
    return next(n for n in sorted(catalog.manifest(step).files) if n.endswith(".distcp"))


@contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """A real S3 endpoint (moto's server mode) on a free loopback port; yields its URL.
    ``env``: moto's own settings (e.g. INITIAL_NO_AUTH_ACTION_COUNT to enforce credentials)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=base_env(env) if env else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def one_line(err: str) -> str:
    """The single ``ftdiff: ...`` line a failed command prints (and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftdiff: ") and "Traceback" not in err, err
    return lines[0]


def raised_in(module: str, error: BaseException) -> BaseException:
    """``error`` as if raised by a function of ``module`` (its frame carries that name): the CLI
    tells the storage layer's errors from a local path's by the frame they come from."""
    namespace: dict[str, object] = {"__name__": module}
    exec("def boom(e):\n    raise e\n", namespace)  # noqa: S102 — a frame with a chosen module name
    try:
        namespace["boom"](error)  # type: ignore[operator]
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("unreachable")


# -- supervisor unit tests: a hand-driven clock, heartbeats, requests to its HTTP server --------
class Clock:
    """A fake clock for JobMonitor: tests move ``t`` forward by hand."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def hb(rank=0, pid=100, step=0, phase="training", world=2, node="0", committed=None,
       started=1.0) -> Heartbeat:
    """A heartbeat of ``rank``, constructed here (so the wire format's validation does not apply)."""
    from service.heartbeat import Heartbeat

    return Heartbeat(rank=rank, local_rank=rank, node=node, pid=pid, world_size=world, step=step,
                     phase=phase, last_committed_step=committed, restart_count=0, time=0.0, started=started)


def post_json(url: str, body: bytes, token: str | None = "tok", *, check: bool = True) -> tuple[int, dict]:
    """POST ``body`` with ``token`` as bearer (no Authorization header when None); (status, JSON
    answer). ``check``: an error status raises urllib's HTTPError; without it, it is returned too."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        if check:
            raise
        return e.code, json.loads(e.read() or b"{}")


def tiny_vae(path: Path) -> Path:
    """A tiny AutoencoderKL (2x downsampling, 4 latent channels), initialised from a fixed seed
    and saved as diffusers does (safetensors): latent diffusion without a download."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            layers_per_block=1, sample_size=16)
    vae.save_pretrained(str(path))
    return path


def shared_once(tmp_path_factory: Any, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(folder)`` once per test session, however many xdist workers ask: the first
    computes it (the others wait on a lock), the rest read its pickled result. For reference
    runs that several workers' module- or session-scoped fixtures would each repeat."""
    import fcntl
    import pickle

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / f"shared-{name}", root / f"shared-{name}.pickle"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return pickle.loads(done.read_bytes())
        folder.mkdir(exist_ok=True)
        result = make(folder)
        done.write_bytes(pickle.dumps(result))
        return result


def tiny_text_encoder(path: Path) -> Path:
    """A tiny CLIP text encoder (hidden size 32) and a character-level CLIP tokenizer (16
    tokens), initialised from a fixed seed and saved as a pipeline folder (text_encoder/,
    tokenizer/): text conditioning without a download."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" on every save otherwise
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(alphabet)})
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(str(path / "tokenizer"))
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, pad_token_id=1, bos_token_id=0,
                            eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPTextModel(config).save_pretrained(str(path / "text_encoder"))
    return path


def train_in_process(root: Path, extra: list[str], steps: int = 3) -> dict[str, torch.Tensor]:
    """The model weights after ``steps`` steps of a one-process run (TINY settings + ``extra``)
    checkpointing under ``root`` (no commits but the final one, no memory tier)."""
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.loop import Trainer

    cfg = load_config(None, TINY + [f'checkpoint.url="{root}"', f"train.max_steps={steps}",
                                    "checkpoint.every_steps=100", "checkpoint.memory_tier=false", *extra])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        assert trainer.run() == 0
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
