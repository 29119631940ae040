"""Checkpoint benchmark: ftdiff's save/commit/load against the usual alternatives, one run.

2 CPU ranks (gloo), ~400 MB of model + AdamW state, written to ``--target`` (a directory or
s3://bucket/prefix; for S3 set AWS_ENDPOINT_URL etc.). Prints one JSON object as the last line:

  stall_s          training blocked per save, ftdiff async, while one forward/backward of the
                   model runs (the copy overlaps it; training only waits before optimizer.step);
                   steady state; the first save is also reported on its own (first_stall_s):
                   its buffers were allocated in the background by warm_up()
  step_overhead_s  how much longer the step that saves takes than a step that does not (on a
                   CPU-only host the copy shares the cores with the forward/backward, so this is
                   where the copy's cost shows even when the stall is near zero)
  stall_no_overlap_s  the same with nothing to overlap (save, then at once optimizer.step)
  commit_s         save start -> committed (checksums, manifest, pointer), ftdiff (median), with
                   nothing else running, as DCP's sync save is timed; commit_overlapped_s: the
                   same while a forward/backward shares the cores (its plain time subtracted)
  samples          the individual dcp_sync_s and commit_s measurements behind the medians (the
                   load's source and the warm-up rounds of each, first, are not in the medians)
  load_s           ftdiff verified resume
  dcp_sync_s       torch.distributed.checkpoint.save (median; each paired with an ftdiff save)
  dcp_async_blocking_s / dcp_async_total_s   stock dcp.async_save
  dcp_load_s       torch.distributed.checkpoint.load (median; interleaved with load_s)
  torch_save_rank0_s  torch.save of the full state by rank 0 (what HF training scripts do)
  memcpy_s         one in-memory copy of the state
  rss_first_mb / rss_last_mb / rss_growth_mb   peak RSS after the first and the last of N saves
  ratios: stall_vs_dcp_sync, stall_vs_memcpy, commit_vs_dcp_sync, load_vs_dcp_load
  raw_upload_s / raw_download_s   S3 targets only, same run: the state's bytes as one object
                   through boto3's multipart transfer at its best concurrency (1, 4, 8, 16
                   threads tried once each), then --repeats more times at that concurrency,
                   uploaded and downloaded by 2 readers at once (as the 2 ranks each read the
                   whole state on resume): what the store can take, as the median of those
                   repeats, the statistic of commit_s and load_s; the ratios
                   commit_throughput_vs_raw_upload, async_save_throughput_vs_raw_upload,
                   dcp_sync_throughput_vs_raw_upload and load_throughput_vs_raw_download are
                   raw time / our time (1.0 = as fast as the raw transfer).
                   raw_upload_min_s / commit_min_s: the fastest single ones, and
                   fastest_commit_vs_fastest_raw_upload their ratio (best against best)

Usage: python bench/checkpoint.py --target /tmp/ckbench [--mb 400] [--repeats 4] [--rss-saves 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


WARMUP_ROUNDS = 2


def build_state(mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose params + AdamW moments come to about ``mb`` megabytes."""
    torch.manual_seed(0)
    width = 2048
    per_layer = width * width * 4 * 3  # weights + exp_avg + exp_avg_sq, fp32
    layers = max(1, round(mb * 1e6 / per_layer))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, group=None) -> float:  # type: ignore[no-untyped-def]
    dist.barrier(group)
    t0 = time.perf_counter()
    fn()
    dist.barrier(group)
    return time.perf_counter() - t0


def fs_for(target: str):  # type: ignore[no-untyped-def]
    from service.checkpoint.storage import open_storage

    return open_storage(target)


def writer_for(target: str):  # type: ignore[no-untyped-def]
    if "://" in target:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(target, sync_files=False)
    return dcp.FileSystemWriter(target)


def reader_for(target: str):  # type: ignore[no-untyped-def]
    if "://" in target:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(target)
    return dcp.FileSystemReader(target)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from prometheus_client import CollectorRegistry

    from service.checkpoint.manager import Checkpointer
    from service.config import load_config
    from service.dist import DistInfo
    from service.metrics import CheckpointMetrics
    from service.train.state import ModelState, OptimizerState, TrainState

    model, opt = build_state(args.mb)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    tensors = [t for t in model.state_dict().values()] + [
        v for s in opt.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v) and v.dim()
    ]
    state_mb = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    base = args.target.rstrip("/") + f"/run-{args.run_id}"
    r: dict[str, float] = {"state_mb": round(state_mb, 1)}

    # One in-memory copy of the state (into preallocated buffers, as a snapshot would).
    bufs = [torch.empty_like(t) for t in tensors]
    for b, t in zip(bufs, tensors):
        b.copy_(t)
    r["memcpy_s"] = statistics.median(
        timed(lambda: [b.copy_(t) for b, t in zip(bufs, tensors)]) for _ in range(args.repeats)
    )

    # Rank 0 writes the whole state with torch.save.
    def torch_save() -> None:
        if rank == 0:
            fs = fs_for(f"{base}/torch_save")
            with fs.fs.open(fs.path("state.pt"), "wb") as f:
                torch.save(state, f)
    r["torch_save_rank0_s"] = timed(torch_save)

    # DCP synchronous save: this one is what the DCP load below reads; more are timed paired
    # with ftdiff's saves further down, so both see the same state of the disk's write-back.
    dcp_state = {"model": ModelState(model), "optimizer": OptimizerState(model, opt)}

    def dcp_sync_save(name: str, keep: bool = False) -> float:
        folder = f"{base}/dcp_sync_{name}"
        took = timed(lambda: dcp.save(dcp_state, storage_writer=writer_for(folder)))
        if not keep and rank == 0:
            # Deleted like ftdiff's retention deletes old checkpoints, so that both write into
            # the same state of the page cache (writing while the kernel must evict is slower).
            fs_for(folder).remove_tree("")
        dist.barrier()
        return took

    dcp_syncs = [dcp_sync_save("0", keep=True)]

    # Stock DCP async_save: blocking part and total.
    async_pg = dist.new_group(backend="gloo")
    blocking, total = [], []
    for i in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(dcp_state, storage_writer=writer_for(f"{base}/dcp_async_{i}"), process_group=async_pg)
        blocking.append(time.perf_counter() - t0)
        fut.result()
        total.append(time.perf_counter() - t0)
        dist.barrier()
    r["dcp_async_blocking_s"] = statistics.median(blocking)
    r["dcp_async_total_s"] = statistics.median(total)

    # ftdiff: async snapshot + background commit, then verified resume.
    cfg = load_config(None, [f'checkpoint.url="{base}/ftdiff"', "checkpoint.every_steps=1",
                             "checkpoint.keep_last=2", *args.set])
    info = DistInfo(rank, world, rank, torch.device("cpu"), "0")
    train = TrainState()
    registry = {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "train_state": train}
    ck = Checkpointer(cfg, info, registry, CheckpointMetrics(CollectorRegistry()), per_rank_keys=(),
                      can_read_state=lambda: bool(opt.state))
    x = torch.randn(args.batch, 2048)

    def forward_backward() -> None:  # reads the weights, writes only .grad
        model(x).square().mean().backward()

    ck.warm_up()  # as the trainer does after its first step: staging buffers allocated ahead
    ck.drain()
    r["fwd_bwd_s"] = statistics.median(timed(forward_backward) for _ in range(3))

    def save_step(step: int, overlap: bool) -> tuple[float, float, float]:
        """(stall, step time beyond a plain forward/backward, save -> committed) of one save."""
        plain = timed(forward_backward) if overlap else 0.0  # the same step without a save
        dist.barrier()
        t0 = time.perf_counter()
        ck.save_at(step, 0, blocking=False)
        if overlap:
            forward_backward()
        ck.before_update()  # where the trainer blocks before optimizer.step()
        step_s = time.perf_counter() - t0
        ok = ck.wait()
        assert ok, "ftdiff save did not commit"
        done = time.perf_counter() - t0 - plain
        ck.drain()  # saves are minutes apart in training: deletions are over before the next
        return ck.last_stall_s, step_s - plain, done

    r["first_stall_s"] = save_step(1, True)[0]

    def paired_save_step(step: int, overlap: bool) -> tuple[float, float, float]:
        dcp_syncs.append(dcp_sync_save(str(step)))
        return save_step(step, overlap)

    # Warm-up rounds, then the measured ones. The first writes of a run are slower for
    # everyone (the page cache is still settling), so the warm-up rounds are recorded in
    # "samples" but left out of every median — for DCP and ftdiff alike.
    runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for i in range(WARMUP_ROUNDS + args.repeats):
        for overlap in (True, False):
            step = 2 + 2 * i + (not overlap)  # increasing, as in training (the pointer follows)
            runs[overlap].append(paired_save_step(step, overlap))
    measured = {overlap: results[WARMUP_ROUNDS:] for overlap, results in runs.items()}
    # dcp_syncs[0] is the load's source; then two per round.
    r["dcp_sync_s"] = statistics.median(dcp_syncs[1 + 2 * WARMUP_ROUNDS:])
    r["stall_s"] = statistics.median(s for s, _, _ in measured[True])
    r["step_overhead_s"] = statistics.median(o for _, o, _ in measured[True])
    r["stall_no_overlap_s"] = statistics.median(s for s, _, _ in measured[False])
    # Like DCP's sync save, with nothing else running; the overlapped saves shared the cores
    # with a forward/backward, so their save -> committed is reported apart.
    r["commit_s"] = statistics.median(c for _, _, c in measured[False])
    r["commit_overlapped_s"] = statistics.median(c for _, _, c in measured[True])
    r["commit_min_s"] = min(c for _, _, c in measured[False])
    r["samples"] = {"dcp_sync_s": [round(x, 3) for x in dcp_syncs],
                    "commit_s": [round(c, 3) for _, _, c in runs[False]]}
    # Peak RSS across many consecutive async saves (retention keeps 2 on storage).
    rss = []
    first_rss_step = 2 * (WARMUP_ROUNDS + args.repeats) + 2
    for step in range(first_rss_step, first_rss_step + args.rss_saves):
        ck.save_at(step, 0, blocking=False)
        forward_backward()
        ck.before_update()
        ck.wait()
        rss.append(rss_mb())
    ck.close()
    # A fresh start on the same root (which fences `ck` off: its saves are over by now).
    fresh = Checkpointer(cfg, info, registry, CheckpointMetrics(CollectorRegistry()), per_rank_keys=(),
                         can_read_state=lambda: bool(opt.state))
    dcp_loads, loads = [], []
    for _ in range(args.repeats):
        dcp_loads.append(timed(lambda: dcp.load(dcp_state, storage_reader=reader_for(f"{base}/dcp_sync_0"))))
        loads.append(timed(fresh.resume))
    r["dcp_load_s"], r["load_s"] = statistics.median(dcp_loads), statistics.median(loads)

    fresh.close()
    if rss:
        r["rss_first_mb"], r["rss_last_mb"] = round(rss[0], 1), round(rss[-1], 1)
        r["rss_growth_mb"] = round(rss[-1] - rss[0], 1)
    if rank == 0:
        Path(out_path).write_text(json.dumps(r))
        fs_for(base).remove_tree("")  # several GB per run: never leave them behind
    dist.barrier()
    dist.destroy_process_group()


RAW_CONCURRENCY = (1, 4, 8, 16)


def raw_s3_transfer(target: str, mb: float, readers: int, repeats: int) -> dict[str, float]:
    """Upload of ``mb`` random megabytes as one object under ``target``, and download of it by
    ``readers`` concurrent readers (a resume reads the whole state on every rank: the job's
    bytes), through boto3's multipart transfer: each concurrency of RAW_CONCURRENCY once, then
    ``repeats`` more times at the best one. Medians of the repeats, like the other medians here:
    a best-of-many raw time against a median of ours would favour the raw transfer."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from boto3.s3.transfer import TransferConfig

    bucket, _, prefix = target[len("s3://"):].partition("/")
    key = f"{prefix.rstrip('/')}/raw-{uuid.uuid4().hex[:8]}".lstrip("/")
    client = boto3.client("s3")
    data = os.urandom(int(mb * 1e6))

    def upload(config: TransferConfig) -> float:
        t0 = time.perf_counter()
        client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
        return time.perf_counter() - t0

    def download(config: TransferConfig) -> float:
        def one(_: int) -> int:
            sink = io.BytesIO()
            client.download_fileobj(bucket, key, sink, Config=config)
            return sink.getbuffer().nbytes

        t0 = time.perf_counter()
        with ThreadPoolExecutor(readers) as pool:
            sizes = list(pool.map(one, range(readers)))
        assert sizes == [len(data)] * readers
        return time.perf_counter() - t0

    def config(threads: int) -> TransferConfig:
        return TransferConfig(multipart_chunksize=8 * 2**20, max_concurrency=threads)

    ups = {threads: upload(config(threads)) for threads in RAW_CONCURRENCY}
    downs = {threads: download(config(threads)) for threads in RAW_CONCURRENCY}
    up_threads, down_threads = min(ups, key=ups.__getitem__), min(downs, key=downs.__getitem__)
    up_times = [upload(config(up_threads)) for _ in range(repeats)]
    down_times = [download(config(down_threads)) for _ in range(repeats)]
    client.delete_object(Bucket=bucket, Key=key)
    return {"raw_upload_s": statistics.median(up_times), "raw_upload_concurrency": up_threads,
            "raw_upload_min_s": min(up_times + list(ups.values())),
            "raw_download_s": statistics.median(down_times), "raw_download_concurrency": down_threads,
            "raw_download_min_s": min(down_times + list(downs.values()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="directory or s3://bucket/prefix (default: a temp dir)")
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--rss-saves", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="batch of the forward/backward that a save overlaps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ftdiff config override for its saves, e.g. checkpoint.writer_threads=4")
    args = p.parse_args()
    tmp = None
    if args.target is None:
        tmp = tempfile.TemporaryDirectory(prefix="ckbench-")
        args.target = tmp.name
    args.run_id = uuid.uuid4().hex[:8]
    from service.supervisor.torchrun import free_port

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.spawn(worker, args=(2, free_port(), args, out.name), nprocs=2, join=True)
        r = json.loads(Path(out.name).read_text())
    r["target"] = "s3" if args.target.startswith("s3://") else "local"
    r["ratios"] = {
        "stall_vs_dcp_sync": round(r["stall_s"] / r["dcp_sync_s"], 3),
        "stall_vs_memcpy": round(r["stall_s"] / r["memcpy_s"], 3),
        "step_overhead_vs_memcpy": round(r["step_overhead_s"] / r["memcpy_s"], 3),
        "stall_no_overlap_vs_memcpy": round(r["stall_no_overlap_s"] / r["memcpy_s"], 3),
        "stall_vs_dcp_async_blocking": round(r["stall_s"] / r["dcp_async_blocking_s"], 3),
        "commit_vs_dcp_sync": round(r["commit_s"] / r["dcp_sync_s"], 3),
        "load_vs_dcp_load": round(r["load_s"] / r["dcp_load_s"], 3),
    }
    if args.target.startswith("s3://"):
        r.update(raw_s3_transfer(args.target, r["state_mb"], readers=2, repeats=args.repeats))
        r["ratios"].update({
            "fastest_commit_vs_fastest_raw_upload": round(r["raw_upload_min_s"] / r["commit_min_s"], 3),
            "commit_throughput_vs_raw_upload": round(r["raw_upload_s"] / r["commit_s"], 3),
            "async_save_throughput_vs_raw_upload": round(r["raw_upload_s"] / r["commit_overlapped_s"], 3),
            "dcp_sync_throughput_vs_raw_upload": round(r["raw_upload_s"] / r["dcp_sync_s"], 3),
            "load_throughput_vs_raw_download": round(r["raw_download_s"] / r["load_s"], 3),
        })
    for k, v in list(r.items()):
        if isinstance(v, float):
            r[k] = round(v, 4)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(r))


if __name__ == "__main__":
    main()
