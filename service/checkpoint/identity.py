"""Which settings define a run's math, and how a start compares with the run it would resume.

A checkpoint records a *fingerprint*: the settings that decide which samples are drawn, with
which noise, and what the optimizer does with them. Resuming with a different fingerprint
would silently change the run (or break exactly-once consumption), so it is refused, naming
each differing key. Everything else (supervisor, metrics, writer threads, retention, logging)
may change freely; ``train.max_steps`` may change with a warning, because the cosine LR
schedule is stretched to the new end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.config import Config, redact_url
from service.data import registry as data_registry
from service.models.build import model_kwargs
from service.models.latent import vae_digest
from service.models.text import text_encoder_digest

# section -> keys whose values define the math of a run. The data keys are the ones the source
# kinds declare (service/data/registry.py).
MATH_KEYS: dict[str, tuple[str, ...]] = {
    "run": ("seed",),
    "model": ("family", "preset", "sample_size", "num_train_timesteps", "conditioning", "num_classes",
              "cond_dropout", "beta_schedule", "prediction_type", "init_from", "vae",
              "text_encoder"),
    "data": data_registry.math_keys(),
    "train": ("global_batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
              "ema_decay", "precision", "snr_gamma"),
}
# May change between starts, with a warning.
SOFT_KEYS = ("train.max_steps",)
# Where a frozen component is read from -> the digest of what is read there. The digest is the
# identity: the same files in another folder (a hub cache copied into an image, a volume mounted
# elsewhere) are the same math, so a moved path is a soft change while the digests agree.
LOCATION_KEYS = {"model.vae": "model.vae_weights", "model.text_encoder": "model.text_encoder_weights"}


def fingerprint(cfg: Config, data_length: int | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The math-defining settings as flat ``section.key`` entries (URLs without secrets)."""
    body = cfg.to_dict()
    out: dict[str, Any] = {}
    own_data_keys = data_registry.math_keys_of(cfg.data.kind)
    for section, keys in MATH_KEYS.items():
        for key in keys:
            if section == "data" and key not in own_data_keys:
                continue  # another source kind's setting: nothing to this run's stream
            value = body[section][key]
            out[f"{section}.{key}"] = redact_url(value) if key == "url" and isinstance(value, str) else value
    for dotted in SOFT_KEYS:
        section, key = dotted.split(".")
        out[dotted] = body[section][key]
    if data_length is not None:
        out["data.length"] = data_length  # a folder whose contents changed changes the stream
    out.update(data or {})  # what the source says defines it (a sharded data set: its index's digest)
    # The model's every constructor argument (preset and model.arch resolved), one entry each,
    # so a changed architecture is refused naming the keyword. As JSON has it (tuples are
    # lists there): the checkpoint's copy went through a manifest.
    for key, value in model_kwargs(cfg.model).items():
        out[f"model.architecture.{key}"] = json.loads(json.dumps(value))
    if cfg.model.vae:  # the latents are the VAE's: its weights are part of the math
        out["model.vae_weights"] = vae_digest(cfg.model.vae)
    if cfg.model.text_encoder:  # so are the captions' hidden states: the encoder's and tokenizer's
        out["model.text_encoder_weights"] = text_encoder_digest(cfg.model.text_encoder)
    return out


# Settings recorded in fingerprints since a later release, with the value every run had before
# (the setting did not exist): an older checkpoint missing one is compared against it, so a
# resume cannot change it unnoticed.
IMPLIED_BEFORE_RECORDED: dict[str, Any] = {
    "model.family": "unet", "model.conditioning": "none", "model.num_classes": 0,
    "model.beta_schedule": "linear", "model.prediction_type": "epsilon", "model.init_from": None,
    "model.vae": None, "model.text_encoder": None, "train.snr_gamma": None,
    "data.resize": "resize",  # images of another size were always resized and centre-cropped
}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(hard, soft) differences as ``key: saved -> now`` lines; keys missing on either side
    (older checkpoints record fewer) are not compared, except those whose value before they
    were recorded is known (``IMPLIED_BEFORE_RECORDED``)."""
    saved = {**{k: v for k, v in IMPLIED_BEFORE_RECORDED.items() if k in current}, **saved}
    hard, soft = [], []
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key]:
            line = f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now"
            soft_change = key in SOFT_KEYS or _moved(key, saved, current) or _was_refused(key, saved)
            (soft if soft_change else hard).append(line)
    return hard, soft


def _was_refused(key: str, saved: dict[str, Any]) -> bool:
    """data.resize away from "refuse": every image trained on so far had the model's size, which
    "resize" and "center-crop" leave as it is, so the samples so far are the same."""
    return key == "data.resize" and saved[key] == "refuse"


def _moved(key: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``key`` names the same component's files at another path (equal digests), or
    the same local data folder spelled another way (a config file's relative ``data.url`` is
    made absolute against the file's folder since 2026-12; before, it was recorded as written)."""
    if key == "data.url":
        return _same_local_folder(saved[key], current[key])
    digest = LOCATION_KEYS.get(key)
    return (digest is not None and saved[key] is not None and current[key] is not None
            and saved.get(digest) is not None and saved.get(digest) == current.get(digest))


def _same_local_folder(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)) or "://" in a + b:
        return False
    return Path(a).resolve() == Path(b).resolve()  # relative: to this working directory


def fingerprint_of_config(recorded: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a checkpoint written before fingerprints were recorded, read
    straight from the config in its manifest — not validated, so keys an older release had
    and this one dropped do not hide the ones that matter. Missing keys are left out (not
    compared); the data length was not recorded."""
    out: dict[str, Any] = {}
    for section, keys in MATH_KEYS.items():
        values = recorded.get(section) if isinstance(recorded, dict) else None
        for key in keys:
            if isinstance(values, dict) and key in values:
                value = values[key]
                out[f"{section}.{key}"] = redact_url(value) if key == "url" and isinstance(value, str) else value
    return out
