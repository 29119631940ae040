"""``ftdiff env`` and ``ftdiff --version``: what this installation is made of.

The first thing to paste into a bug report: versions of the packages that touch checkpoints
and training, the platform, and what torch sees of CUDA, NCCL and MPS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from service.errors import EXIT_OK

# Distributions whose versions matter for training and checkpoints (pip names).
PACKAGES = ("torch", "diffusers", "fsspec", "s3fs", "botocore", "aiobotocore", "crc32c", "prometheus-client",
            "pydantic", "numpy", "safetensors", "pillow", "tensorboard", "rich")
# Their import names, where not the pip name with "_" for "-".
_MODULES = {"prometheus-client": "prometheus_client", "pillow": "PIL"}


def ftdiff_version() -> str:
    """The installed distribution's version; the package's own when it is not installed
    (run from a source tree)."""
    try:
        return metadata.version("ftdiff")
    except metadata.PackageNotFoundError:
        import service

        return str(getattr(service, "__version__", "unknown"))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def import_error(dist: str) -> str | None:
    """Why an installed package fails to import (``ImportError: libcudart.so.13: ...``), or
    None when it imports: a wheel whose metadata is there but whose import breaks (a missing
    CUDA library, a half-removed install) is what a bug report most needs to show."""
    import importlib

    try:
        importlib.import_module(_MODULES.get(dist, dist.replace("-", "_")))
    except Exception as e:  # noqa: BLE001 — any import failure is reported, never fatal
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
    return None


def _accelerators(torch_error: str | None = None) -> dict[str, Any]:
    """CUDA, NCCL and MPS as torch sees them; every probe is guarded (a broken driver must not
    break the command meant to report it)."""
    if torch_error is not None:  # torch does not import: nothing to ask it
        why = f"torch is broken: {torch_error}"
        return {"cuda": {"available": False, "version": None, "devices": [], "error": why},
                "nccl": {"available": False, "version": None}, "mps": False}
    import torch

    cuda: dict[str, Any] = {"available": False, "version": torch.version.cuda, "devices": []}
    try:
        if torch.cuda.is_available():
            cuda["available"] = True
            cuda["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001 — a driver/runtime mismatch raises here; report it
        cuda["error"] = f"{type(e).__name__}: {e}"
    nccl: dict[str, Any] = {"available": False, "version": None}
    try:
        import torch.distributed as dist

        nccl["available"] = bool(dist.is_available() and dist.is_nccl_available())
        if nccl["available"]:  # the library version; needs no device
            version = torch.cuda.nccl.version()
            nccl["version"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception as e:  # noqa: BLE001 — reported, never fatal
        nccl["error"] = f"{type(e).__name__}: {e}"
    try:
        mps = bool(torch.backends.mps.is_available())
    except Exception:  # noqa: BLE001 — old builds lack the backend
        mps = False
    # torch's own string: it names the build ("+cu130", "+cpu"), which the wheel metadata may not.
    return {"torch": torch.__version__, "cuda": cuda, "nccl": nccl, "mps": mps}


def environment() -> dict[str, Any]:
    """Everything ``ftdiff env`` reports, as one JSON-able dict (package versions at the top
    level, None where a package is not installed; ``import_errors``: {package: error} for
    installed packages that fail to import)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS
        usable = os.cpu_count()
    body: dict[str, Any] = {"python": platform.python_version(), "ftdiff": ftdiff_version()}
    body.update({dist: _version(dist) for dist in PACKAGES})
    errors = {dist: import_error(dist) for dist in PACKAGES if body[dist] is not None}
    body["import_errors"] = {dist: error for dist, error in errors.items() if error is not None}
    body.update({
        "platform": platform.platform(), "machine": platform.machine(),
        "python_executable": sys.executable, "cpu_count": os.cpu_count(), "cpu_usable": usable,
    })
    body.update(_accelerators(body["import_errors"].get("torch") if body["torch"] else "not installed"))
    return body


def cmd_env(args: argparse.Namespace) -> int:
    body = environment()
    if args.json:
        print(json.dumps(body, indent=2))
        return EXIT_OK
    cuda, nccl = body["cuda"], body["nccl"]
    broken = body["import_errors"]
    lines = [(key, f"broken: {broken[key]} (installed: {body[key]})" if key in broken
              else body[key] or "not installed") for key in ("python", "ftdiff", *PACKAGES)]
    lines += [("platform", f"{body['platform']} ({body['machine']})"),
              ("cpus", f"{body['cpu_count']} ({body['cpu_usable']} usable by this process)")]
    if cuda["available"]:
        lines.append(("cuda", f"{cuda['version']}, {len(cuda['devices'])} device(s): {', '.join(cuda['devices'])}"))
    else:
        built = f"torch built with CUDA {cuda['version']}" if cuda["version"] else "CPU-only torch build"
        lines.append(("cuda", f"not available ({cuda.get('error') or built})"))
    lines.append(("nccl", nccl["version"] or ("available" if nccl["available"] else "not available")))
    if body["mps"] or sys.platform == "darwin":
        lines.append(("mps", "available" if body["mps"] else "not available"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK
