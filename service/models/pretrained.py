"""``model.init_from``: start a run from the weights of a diffusers model folder of the same
family (an ``ftdiff export --format diffusers``, or any ``save_pretrained`` output).

Only safetensors files are read (a pickled ``.bin`` could run code on load), the folder's
``config.json`` must name the family's class, and every tensor must fit the configured
architecture: a mismatch is an error naming the keys, never a partial load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from service.errors import UserError

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Written by `ftdiff train --from URL --weights-only` beside the weights it exported: where they
# came from, recorded as the new run's lineage.
SOURCE_FILE = "ftdiff-source.json"
# A pipeline folder keeps its denoiser in one of these.
DENOISER_FOLDERS = ("unet", "transformer")


def model_folder(path: str) -> Path:
    """The folder with the denoiser's config.json: ``path`` itself, or a pipeline's denoiser."""
    root = Path(path)
    if (root / "config.json").is_file():
        return root
    for name in DENOISER_FOLDERS:
        if (root / name / "config.json").is_file():
            return root / name
    raise UserError(f"model.init_from = {path!r}: not a diffusers model or pipeline folder (no config.json "
                    f"in it or in {'/'.join(DENOISER_FOLDERS)}/)")


def misfit(own: dict[str, torch.Size], given: dict[str, torch.Size]) -> str | None:
    """What keeps weights of shapes ``given`` from loading into a model of shapes ``own``: the
    tensors missing, unexpected or of another shape (the first three of each); None if they fit."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    misshapen = sorted(k for k in set(own) & set(given) if own[k] != given[k])
    if not (missing or unexpected or misshapen):
        return None
    return "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("other shape", misshapen)) if keys)


def load_init_weights(path: str, model: torch.nn.Module) -> None:
    """Copy the weights under ``path`` into ``model`` (same class and architecture)."""
    from safetensors.torch import load_file

    folder = model_folder(path)
    config = json.loads((folder / "config.json").read_text())
    wanted = type(model).__name__
    if config.get("_class_name") != wanted:
        raise UserError(f"model.init_from = {path!r} holds a {config.get('_class_name')!r}, but this run's "
                        f"model.family builds a {wanted}")
    if (folder / SHARD_INDEX).is_file():
        shards = sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
    elif (folder / WEIGHTS).is_file():
        state = load_file(str(folder / WEIGHTS))
    else:
        raise UserError(f"model.init_from = {path!r}: no {WEIGHTS} in {folder} (only safetensors are read)")
    own = model.state_dict()
    detail = misfit({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in state.items()})
    if detail:
        raise UserError(f"model.init_from = {path!r} does not fit this run's architecture ({detail}); set "
                        "model.preset / model.arch to the architecture it was trained with")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])


def source_lineage(path: str | None) -> dict[str, Any] | None:
    """The lineage of a run started from ``path`` (model.init_from) where ``--weights-only``
    exported it from another run's checkpoint: parent, its root and run, the step, and what
    changed ("weights only"); None for any other folder."""
    if not path:
        return None
    try:
        source = json.loads((Path(path) / SOURCE_FILE).read_text())
        return {"parent": str(source["parent"]), "parent_root": str(source.get("parent_root") or ""),
                "parent_run": str(source.get("parent_run") or ""), "step": int(source["step"]),
                "changed": ["weights only (--weights-only): fresh optimizer, step 0"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
