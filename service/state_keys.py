"""The state registry's keys: the top-level names inside every checkpoint.

Constant, because checkpoints written by one version must be readable by the next; below both
the worker (which registers state under them) and the tools that read weights back out.
"""

MODEL, EMA, OPTIMIZER, LR_SCHEDULER, GRAD_SCALER = "model", "ema", "optimizer", "lr_scheduler", "grad_scaler"
TRAIN_STATE, DATA, RNG = "train_state", "data", "rng"
# Differs per rank (restored only at the world size it was saved with).
PER_RANK_KEYS = frozenset({RNG})
