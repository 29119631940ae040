"""The ``[metrics]`` and ``[logging]`` sections: what a run exports and where it logs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from service.config.section import Section
from service.redact import redact_url


class MetricsConfig(Section):
    host: str = "127.0.0.1"
    """Address of the supervisor's /metrics, /healthz, /readyz (loopback by default)."""
    port: int = Field(default=9400, ge=0, le=65535)
    """Port of /metrics, /healthz and /readyz (0: any free port)."""


Tracker = Literal["tensorboard", "mlflow", "wandb"]


class LoggingConfig(Section):
    trackers: list[Tracker] = ["tensorboard"]
    """Where rank 0 sends the scalars (loss, lr, throughput, data wait, save times) and sample
    grids: any of tensorboard, mlflow (pip install 'ftdiff[mlflow]'), wandb (pip install
    'ftdiff[wandb]'). A tracker that fails is logged once and counted
    (ftdiff_train_tracker_failures_total); training goes on."""
    tensorboard: bool = True
    """Write TensorBoard event files where trackers lists tensorboard (false: not even then)."""
    tensorboard_dir: str | None = None
    """Local path or file://; default <run dir>/tensorboard (run dir: a local checkpoint.url's parent)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or store (http://host:5000, sqlite:///path/mlflow.db, databricks);
    default $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db with artifacts beside it."""
    mlflow_experiment: str = "ftdiff"
    """MLflow experiment of the run (created if missing)."""
    wandb_project: str = "ftdiff"
    """Weights & Biases project of the run."""
    wandb_entity: str | None = None
    """Weights & Biases team or user; default: the API key's."""
    wandb_mode: Literal["online", "offline"] | None = None
    """online, or offline (files under <run dir>/wandb, `wandb sync` later); default $WANDB_MODE, else online."""
    sample_every: int = Field(default=100, ge=0)
    """A grid every N steps and at the last step (0: none), to <run dir>/samples/step-N.png."""
    sample_n: int = Field(default=16, ge=1, le=256)
    """Images in each sample grid."""
    sample_steps: int = Field(default=50, ge=1, le=1000)  # sampling steps; all: docs/operations.md
    """Denoising steps of each sample grid."""
    @field_validator("trackers")
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"names a tracker twice: {v}")
        return v

    @field_validator("tensorboard_dir")
    def _local(cls, v: str | None) -> str | None:  # event files are appended to: no object stores
        if v is not None and "://" in v and not v.startswith("file://"):
            raise ValueError(f"{redact_url(v)!r} is not local; TensorBoard writes to a path or file:// URL")
        return v
