"""How many worker processes `ftdiff train` starts per node: one per visible GPU by default."""

from __future__ import annotations

import os

from service.errors import UserError

CPU_PROCESSES = 2  # on a machine without GPUs: enough for DDP to be exercised, few enough for a laptop


def visible_gpus() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(requested: str, gpus: int | None = None) -> int:
    """``--nproc-per-node``: "auto" is one process per visible GPU (2 on a CPU machine); a
    number above the visible GPUs is refused, since rank r trains on cuda:r."""
    gpus = visible_gpus() if gpus is None else gpus
    if requested == "auto":
        return gpus or CPU_PROCESSES
    try:
        count = int(requested)
    except ValueError:
        raise UserError(f"--nproc-per-node {requested!r} is neither a number nor \"auto\"") from None
    if count < 1:
        raise UserError(f"--nproc-per-node {count}: at least 1 process per node")
    if gpus and count > gpus:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"--nproc-per-node {count} but only {gpus} GPU(s) are visible"
            + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
            + f": rank r trains on cuda:r. Use --nproc-per-node auto ({gpus}) or at most {gpus}")
    return count
