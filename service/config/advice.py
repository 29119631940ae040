"""Settings that are valid but almost certainly not what was meant: said once at start-up (rank
0, and `ftdiff train --dry-run`), never refused."""

from __future__ import annotations

from service.config.schema import Config


def config_advice(cfg: Config) -> list[str]:
    """One line per suspicious combination."""
    said = []
    t = cfg.train
    if t.warmup_steps and t.max_steps <= t.warmup_steps:
        said.append(f"train.max_steps = {t.max_steps} <= train.warmup_steps = {t.warmup_steps}: the learning rate "
                    "never reaches train.lr and the cosine decay never starts; lower train.warmup_steps")
    if cfg.checkpoint.every_steps > t.max_steps:
        said.append(f"checkpoint.every_steps = {cfg.checkpoint.every_steps} > train.max_steps = {t.max_steps}: only "
                    "the last step is committed, and a crash before it loses the whole run")
    d = cfg.divergence
    if d.spike_factor and d.history > t.max_steps:
        said.append(f"divergence.history = {d.history} > train.max_steps = {t.max_steps}: spikes are judged against "
                    "fewer steps than the history asks for")
    return said
