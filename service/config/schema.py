"""The config's sections and keys (pydantic, strict, unknown keys forbidden): the contract of
``[run]``, ``[model]``, ``[data]``, ``[train]``, ``[checkpoint]``, ``[supervisor]``,
``[divergence]``, ``[metrics]`` and ``[logging]``."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from service.config.hashing import stable_hash
from service.config.observability import LoggingConfig, MetricsConfig
from service.config.section import Section as _Section
from service.data.registry import SOURCES
from service.models.registry import DEFAULT_FAMILY, FAMILIES
from service.redact import redact_config_dict


def run_folder(name: str) -> str:
    """The folder a run name gives: the name itself when it is a plain folder name (letters,
    digits, '.', '_', '-'; at most 100); else a plain version of it plus a digest of the whole
    name, so that two names never share a folder ("a b" and "a-b" do not)."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", name):
        return name
    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "run"
    return f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class RunConfig(_Section):
    name: str = "ftdiff"
    """Run name; without checkpoint.url the run lives under runs/<run.name>/ (checkpoints,
    TensorBoard, sample grids; characters other than letters, digits, '.', '_', '-' become '-')."""
    seed: int = 0
    """Seeds the data order, augmentation, noise and timesteps and the model init."""

    @field_validator("name", mode="before")
    @classmethod
    def _number_as_name(cls, v: object) -> object:  # --set run.name=5: TOML reads a number
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class ModelConfig(_Section):
    family: str = DEFAULT_FAMILY
    """The denoiser's family (service/models/registry.py): unet (diffusers' UNet2DModel,
    unconditional or class-conditional), unet-cond (UNet2DConditionModel, text-conditional),
    dit (DiTTransformer2DModel, class-conditional)."""
    preset: str = "tiny"
    """The family's size. unet: tiny (CPU tests), small, base (GPU, 64x64); unet-cond: tiny,
    small; dit: tiny, S/2, B/2."""
    arch: dict[str, Any] = {}
    """Any constructor keyword of the family's diffusers class, over the preset's
    (``[model.arch]`` or ``--set model.arch.layers_per_block=2``); checked by building the
    model on the meta device before anything starts."""
    sample_size: int | None = Field(default=None, ge=8, le=1024)
    """The denoiser's input side in pixels; defaults to the preset's. Must suit the model's
    downsampling (UNet) or patch size (DiT)."""
    num_train_timesteps: int = Field(default=1000, ge=10)
    """Diffusion steps of the noise schedule the model is trained on (sampling may use fewer)."""
    conditioning: Literal["none", "class", "text"] = "none"
    """class: the data's labels (a folder's first-level subfolders; the shape of ``shapes``
    and ``synthetic``; the digit of ``digits``) condition the model, with classifier-free
    guidance at sampling (``ftdiff sample --class K --guidance-scale S``). text: the images'
    captions (a folder's ``.txt`` beside each image; generated for ``shapes``, ``synthetic``
    and ``digits``) through ``model.text_encoder`` (``ftdiff sample --prompt TEXT``)."""
    num_classes: int = Field(default=0, ge=0, le=1000)
    """Classes of a class-conditional model (at least the data's; a label of the data at or
    above it is an error at start-up)."""
    cond_dropout: float = Field(default=0.1, ge=0, lt=1)
    """Share of samples trained with the label dropped (the "null" class) or the caption
    emptied, which classifier-free guidance needs; which ones is a pure function of (seed,
    epoch, index)."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    """The noise schedule: linear (DDPM), scaled_linear (Stable Diffusion), squaredcos_cap_v2 (cosine)."""
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    """What the model predicts: the noise, the velocity v, or the clean sample."""
    vae: str | None = None
    """Latent diffusion: a diffusers AutoencoderKL (a local folder, a pipeline folder with vae/,
    or a hub id already in the local cache), frozen. model.sample_size is then the latent
    side; images are brought to it times the VAE's downsampling."""
    text_encoder: str | None = None
    """Text conditioning: a frozen transformers text encoder and its tokenizer (a folder with
    text_encoder/ and tokenizer/, a folder with both, or a hub id already in the local cache).
    Its hidden size is the UNet's cross-attention width."""
    init_from: str | None = None
    """A diffusers model (or pipeline) folder of the same family to start from: weights only
    (safetensors), a fresh optimizer. Part of the run's identity; resumes come from the run's
    own checkpoints as always."""

    @model_validator(mode="after")
    def _known_family_and_preset(self) -> "ModelConfig":
        family = FAMILIES.get(self.family)
        if family is None:
            raise ValueError(f"model.family = {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.preset not in family.presets:
            raise ValueError(f"model.preset = {self.preset!r} is not a preset of family {self.family!r} "
                             f"({', '.join(family.presets)})")
        if self.conditioning not in family.conditionings:
            raise ValueError(f"model.conditioning = {self.conditioning!r}: family {self.family!r} supports "
                             f"{', '.join(family.conditionings)}")
        if self.conditioning == "text" and not self.text_encoder:
            raise ValueError("model.conditioning = 'text' needs model.text_encoder (a folder with text_encoder/ "
                             "and tokenizer/)")
        if self.text_encoder and self.conditioning != "text":
            raise ValueError(f"model.text_encoder is set but model.conditioning = {self.conditioning!r}; "
                             "set model.conditioning = 'text' (model.family = 'unet-cond') or drop it")
        if self.conditioning == "class" and self.num_classes < 1:
            raise ValueError("model.conditioning = 'class' needs model.num_classes (at least the data's classes)")
        return self


def _file_url_with_slashes(v: object) -> object:
    """``file:x`` (no ``//``): fsspec takes it, the rest of a run (logs, status, identity) would
    take it for a folder named ``file:``; refused, naming the two spellings that work."""
    if isinstance(v, str) and v[:5].lower() == "file:" and v[5:7] != "//":
        raise ValueError(f"{v!r}: write a local path as a plain path or as file://<path> (file:///abs/path)")
    return v


class DataConfig(_Section):
    kind: str = "shapes"
    """Where the images come from: a kind of service/data/registry.py (shapes, the quick demo,
    by default)."""
    url: str | None = None
    """Image folder (kind=folder) or sharded data set with its index.json (kind=webdataset):
    a local path or fsspec URL such as s3://bucket/images. A relative path in a config file is
    relative to the file's folder (on the command line: to the working directory)."""
    _file_url = field_validator("url")(_file_url_with_slashes)
    epoch_size: int = Field(default=50_000, ge=1)
    """Samples per epoch of the shapes and synthetic data (infinite; an epoch is a naming unit)."""
    num_workers: int = Field(default=0, ge=0, le=64)
    """DataLoader worker processes per rank. Does not change the samples or the math."""
    hflip: bool = True
    """Random horizontal flip; the decision is a pure function of (seed, epoch, index)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """A sample that cannot be decoded (a folder's file; a shard's member, or a missing or
    corrupt shard): stop with an error naming it, or train on the next decodable sample instead
    (the same one on every run and world size; counted). kind=folder and webdataset."""
    resize: Literal["refuse", "resize", "center-crop"] = "refuse"
    """kind=folder and webdataset: what becomes of an image that is not of the model's input size
    (model.sample_size, or its pixel size with a VAE): "refuse" (exit 2 naming the image and its
    size), "resize" (shorter side scaled to the input, centre-cropped) or "center-crop" (the
    central square of the input's size, not scaled; smaller images are refused). Part of the
    run's math (leaving "refuse" on resume is allowed: every image so far had the right size)."""
    shuffle_window: int = Field(default=1000, ge=1)
    """kind=webdataset: samples shuffled together after the shards are shuffled (a window spans
    window / shard size + 1 shards, read whole and in order). Part of the run's math."""
    cache_dir: str | None = None
    """kind=webdataset: where a node keeps the shards it read (default: the temp folder); the
    ranks of a node share it."""
    cache_limit_gb: float = Field(default=20.0, gt=0)
    """kind=webdataset: the cache's size limit; the least recently used shards go first."""
    read_retry_s: float = Field(default=60.0, ge=0)
    """kind=webdataset: how long a shard read is retried (backoff 1, 2, 4 ... s) on transient
    storage errors before the job stops with exit 3."""

    skip: list[list[int]] = Field(default_factory=list)
    """Ranges [start, end) of positions in the global sample stream never trained on: a step
    whose batch would overlap one begins at its end. A rollback adds its window to the ones
    the checkpoint records; set this to skip data deliberately (e.g. to reproduce a rollback)."""

    @field_validator("skip")
    def _ranges(cls, v: list[list[int]]) -> list[list[int]]:
        from service.data.skips import MAX_POSITION, MAX_WINDOWS

        if len(v) > MAX_WINDOWS:
            raise ValueError(f"data.skip: {len(v)} windows; at most {MAX_WINDOWS} (merge neighbouring ones)")
        for pair in v:
            if len(pair) != 2 or not 0 <= pair[0] < pair[1] <= MAX_POSITION:
                raise ValueError(f"data.skip: {pair} is not a range [start, end) with 0 <= start < end <= 2^62")
        return v

    @model_validator(mode="after")
    def _known_kind_with_its_url(self) -> "DataConfig":
        kind = SOURCES.get(self.kind)
        if kind is None:
            raise ValueError(f"data.kind = {self.kind!r} is not one of {', '.join(SOURCES)}")
        if kind.needs_url and not self.url:
            raise ValueError(f"data.kind = {self.kind!r} needs data.url (a local path or fsspec URL)")
        return self


class TrainConfig(_Section):
    max_steps: int = Field(default=500, ge=1)
    """Optimizer steps of the run; the last one is always committed."""
    global_batch_size: int = Field(default=64, ge=1)
    """Samples per optimizer step over all ranks; must divide by the world size. The default
    job (500 x 64, lr 5e-3, data.kind = "shapes") draws recognisable shapes after about a
    minute on two CPU cores (docs/benchmarks.md, "Sample quality of the default job")."""
    lr: float = Field(default=5e-3, gt=0)
    """Peak AdamW learning rate (after warm-up; cosine decay to lr * min_lr_ratio)."""
    warmup_steps: int = Field(default=50, ge=0)
    """Steps of linear learning-rate warm-up."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio at max_steps."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradients are clipped to this global norm (the norm before clipping feeds the divergence checks)."""
    ema_decay: float = Field(default=0.999, gt=0, lt=1)
    """Decay of the exponential moving average of the weights that sampling and export use by default."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. fp16 enables the grad scaler."""
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)
    """Micro-batches per optimizer step on each rank: the global batch (and so the math) stays
    train.global_batch_size whatever the world size, in smaller pieces of memory."""
    snr_gamma: float | None = Field(default=None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the usual value); unset: plain MSE."""
    compile: bool = False
    """torch.compile the denoiser: faster steps after a warm-up that every (re)start pays unless
    the inductor cache (TORCHINDUCTOR_CACHE_DIR) survives it."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    log_every: int = Field(default=10, ge=1)
    """Steps between progress lines, TensorBoard scalars and the rate metrics."""
    collective_timeout_s: float = Field(default=300.0, gt=0, lt=1e7)
    """How long a collective waits for a peer: long enough for a slow checkpoint load, short
    enough that a peer gone without a broken connection becomes an error, not a silent hang."""
    step_sleep_s: float = Field(default=0.0, ge=0, le=10)
    """Artificial delay per step, for fault-injection tests and demos only."""


class CheckpointConfig(_Section):
    url: str = "runs/ftdiff/checkpoints"
    """Root of this run's checkpoints: path, file://, s3://bucket/prefix or memory://. Unset:
    runs/<run.name>/checkpoints, so that each run name has its own root, logs and samples. A
    relative path in a config file is relative to the file's folder."""
    every_steps: int = Field(default=50, ge=1)
    """Steps between checkpoints (the last step and a preemption are always committed)."""
    keep_last: int = Field(default=3, ge=2)
    """Committed checkpoints kept; >= 2 because the newest may still be in flight."""
    keep_every: int = Field(default=0, ge=0)
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    async_: bool = Field(default=True, alias="async")
    """Write in the background; training blocks only for an in-memory snapshot."""
    when_busy: Literal["wait", "skip"] = "wait"
    """A save comes due while the previous one is still writing: wait for it, or skip this
    one (all ranks decide together; counted in ftdiff_checkpoint_saves_skipped_total)."""
    writer_threads: int = Field(default=0, ge=0, le=32)
    """Files (and upload streams) per rank per save. 0: automatic — 4 on object stores (one
    upload stream each; s3fs uploads a file's parts one after another), 1 on file systems."""
    resume: str = "auto"
    """auto: latest committed under url, if any; never: start fresh; or a checkpoint URL."""
    _file_urls = field_validator("url", "resume")(_file_url_with_slashes)
    grace_s: float = Field(default=30.0, gt=0)
    """Time allowed for the emergency checkpoint after SIGTERM."""
    endpoint_url: str | None = None
    """S3 endpoint (SeaweedFS, MinIO, Ceph, ...); default: AWS_ENDPOINT_URL or AWS's own."""
    region: str | None = None
    """S3 region; default: AWS_REGION or the store's own."""
    memory_tier: bool = True
    """When a worker dies, the survivors leave the state of their last completed step in
    node-local shared memory and the restart resumes there (zero steps lost) if it is newer
    than the newest commit; the object store stays the durable tier."""
    memory_tier_dir: str | None = None
    """Directory of the memory tier's files; default /dev/shm/ftdiff-memory-<uid> (a tempdir
    when /dev/shm is missing)."""
    memory_every_steps: int = Field(default=0, ge=0)
    """Also leave the state in the memory tier every this many steps, from a background
    thread (0: only on the way out). Covers every process of a node dying at once (nobody is
    left to leave the state: the agent's process group killed, a container restarted in its
    pod): the restart then loses at most this many steps instead of a checkpoint interval.
    Costs one write of the state into shared memory per interval and keeps up to two
    snapshots of it resident there."""
    storage_retry_s: float = Field(default=30.0, ge=0)
    """After a save fails, the store is probed again (1, 2, 4 ... s apart); if it still denies
    access or its bucket is gone after this long, the job stops with exit code 3 instead of
    training on without checkpoints. Transient failures (timeouts, 5xx) never stop it."""
    single_writer: bool = False
    """Accept an S3 store that ignores conditional writes (If-None-Match / If-Match), which
    start-up otherwise refuses: the operator guarantees that only one start of this job ever
    writes the root at a time, because fencing of a superseded writer then cannot be enforced."""


class SupervisorConfig(_Section):
    hang_timeout_s: float = Field(default=60.0, gt=0)
    """No heartbeat, or no training progress, for this long is a hang."""
    io_timeout_s: float = Field(default=300.0, gt=0)
    """No progress (no bytes read or written) in a checkpoint load or save, or a wait for the
    store, for this long — or three times the longest such phase so far, if more — is a hang.
    Heartbeats must still arrive every hang_timeout_s: a stopped process is caught as fast."""
    startup_timeout_s: float = Field(default=180.0, gt=0)
    """Local mode: agents run but no worker has reported for this long since their launch, a
    restart order or the last heartbeat (stuck in rendezvous or start-up): end and relaunch them.
    Every mode: how long a process's first training step may take without progress (torch.compile,
    autotuning, the first collectives) before it is a hang."""
    max_restarts: int = Field(default=10, ge=0)
    """Relaunches without a new commit before the job gives up (exit 1); a new commit renews them."""
    min_nodes: int | None = Field(default=None, ge=1)
    """Smallest node count the job may shrink to; default: all nodes (no shrinking)."""
    exclude_diverged_nodes: bool = False
    """Local mode: a node whose replica disagreed with the majority (divergence.replica_check_every)
    is left out: the job is relaunched without it while supervisor.min_nodes allows (else it is
    only reported). Attach mode reports it (cordon the node)."""
    exclude_slow_after_s: float = Field(default=0.0, ge=0)
    """Local mode: a node whose slowest rank computes below 0.7 of the fastest rank's speed for
    this long is left out, as above; 0: never. Attach mode reports it."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    """Seconds between a worker's heartbeats to the supervisor."""
    host: str = "127.0.0.1"
    """Address the supervisor binds (heartbeats, /metrics, /healthz). Loopback by default;
    binding wider (0.0.0.0 in a pod) is an explicit choice."""
    port: int = Field(default=29450, ge=0, le=65535)
    """Port of the supervisor's heartbeat and control endpoint (0: any free port)."""
    url: str | None = None
    """Where workers send heartbeats (attach mode, e.g. http://ftdiff-supervisor:29450);
    the local launcher sets FTDIFF_SUPERVISOR_URL itself. Unset: no heartbeats."""
    token: str | None = None
    """Shared secret for heartbeats and control requests; default: FTDIFF_TOKEN."""
    crash_loop_failures: int = Field(default=3, ge=1)
    """Failures without a new commit that count as a crash loop (then: exponential backoff)."""
    prestart_workers: bool = True
    """Local mode: a warm process per node (torch and the worker imported) forks each worker,
    and torchrun starts a thin shim instead of the full entry: restarts skip ~4 s of imports
    (MTTR of a worker crash ~1 s instead of ~3 s; docs/benchmarks.md). Costs one interpreter
    per node (~400 MB, shared copy-on-write) and a few seconds at job start."""


class DivergenceConfig(_Section):
    """Faults that do not crash: when training is judged diverged, the workers roll back in
    place to the newest good commit and skip the data that led there (docs/operations.md)."""

    spike_factor: float = Field(default=8.0, ge=0)
    """A step's loss or gradient norm above this multiple of its recent median is suspicious
    (0: no spike detection)."""
    spike_steps: int = Field(default=3, ge=1, le=1000)
    """Suspicious steps in a row that make a spike."""
    history: int = Field(default=50, ge=10, le=100_000)
    """Steps the recent median is taken over."""
    nonfinite_steps: int = Field(default=3, ge=1, le=1000)
    """Non-finite steps in a row (each one skipped) that make a divergence."""
    skip_steps: int = Field(default=10, ge=0, le=1_000_000)
    """Batches skipped past the offending ones after a rollback."""
    max_rollbacks: int = Field(default=3, ge=0, le=1000)
    """Rollbacks per run; one more divergence stops the job with exit 47."""
    replica_check_every: int = Field(default=100, ge=0)
    """Steps between checks that every rank holds the same weights and optimizer state (0: never)."""


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    divergence: DivergenceConfig = DivergenceConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="before")
    @classmethod
    def _root_by_run_name(cls, data: Any) -> Any:
        """No checkpoint.url: the run lives under runs/<run.name>/ (the default name keeps the
        default root, runs/ftdiff/checkpoints)."""
        if not isinstance(data, dict):
            return data
        checkpoint, run = data.get("checkpoint", {}), data.get("run", {})
        if not (isinstance(checkpoint, dict) and isinstance(run, dict)) or "url" in checkpoint:
            return data
        name = RunConfig._number_as_name(run.get("name", RunConfig().name))
        if not isinstance(name, str):
            return data  # RunConfig refuses it
        return {**data, "checkpoint": {**checkpoint, "url": f"runs/{run_folder(name)}/checkpoints"}}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def redacted_dict(self) -> dict[str, Any]:
        """``to_dict()`` without secrets: what manifests, exports, logs and metrics may record.

        The token becomes ``***`` (None stays None, so "no token" remains visible) and every
        URL-valued setting loses its ``user:password@`` (see ``redact_url``).
        """
        return redact_config_dict(self.to_dict())

    def hash(self) -> str:
        """Stable digest of the settings, recorded in every checkpoint manifest.

        Computed over the settings as the manifest records them (``redacted_dict``), so the
        digest never carries a secret (a 64-bit digest of a short token could be brute-forced)
        and a secret only counts as set or unset. Keys added later are left out while they
        hold their default (a section left empty too): a config keeps its hash on upgrades
        (``service.config.hashing``).
        """
        return stable_hash(self.redacted_dict(), Config().redacted_dict())
