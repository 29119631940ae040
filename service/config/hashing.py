"""The config's digest, recorded in every manifest: stable across upgrades that add keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# The keys config hashes were first recorded with. A key added since is left out of the hash
# while it holds its default (hash()), so adding a setting never changes an old config's hash:
# add keys freely, never add one here.
_HASHED_FROM_THE_START: dict[str, frozenset[str]] = {section: frozenset(keys.split()) for section, keys in {
    "run": "name seed",
    "model": "preset sample_size num_train_timesteps",
    "data": "kind url epoch_size num_workers hflip",
    "train": "max_steps global_batch_size lr warmup_steps min_lr_ratio weight_decay grad_clip ema_decay "
             "precision log_every step_sleep_s",
    "checkpoint": "url every_steps keep_last keep_every async when_busy writer_threads resume grace_s "
                  "endpoint_url region",
    "supervisor": "hang_timeout_s io_timeout_s startup_timeout_s max_restarts min_nodes heartbeat_interval_s "
                  "host port url token crash_loop_failures prestart_workers",
    "metrics": "host port",
}.items()}
# Recorded from the start, but their default changed later: a config that leaves one at today's
# default keeps the hash it had when it spelled out the value (see hash()).
_DEFAULT_CHANGED: dict[tuple[str, str], Any] = {("supervisor", "prestart_workers"): True}


def stable_hash(body: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The digest of ``body`` (a redacted config dict), leaving out every key added since hashes
    were first recorded while it holds its default (``defaults``), and sections left empty."""
    body = {section: dict(values) for section, values in body.items()}
    for section, values in body.items():
        for key in list(values):
            added_later = key not in _HASHED_FROM_THE_START.get(section, frozenset())
            if (added_later or (section, key) in _DEFAULT_CHANGED) and values[key] == defaults[section][key]:
                del values[key]
    blob = json.dumps({s: values for s, values in body.items() if values != {}}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
