"""The training loop: get batch, noise it, predict the noise, step, log, maybe checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from service import faults
from service.checkpoint.identity import fingerprint
from service.checkpoint.manager import Checkpointer
from service.checkpoint.memory_tier import default_dir
from service.checkpoint.storage import check_shared
from service.checkpoint.storage_health import wait_until_reachable
from service.config import Config
from service.data.stream import (
    TrainingSamples,
    build_loader,
    build_source,
    check_batch_geometry,
    data_identity,
    training_captions,
    training_labels,
)
from service.dist import DistInfo
from service.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from service.heartbeat import LEAVE_SIGNAL, Heartbeat, HeartbeatSender, shared_token
from service.launch_env import LaunchEnv
from service.metrics import WorkerMetrics, metric_samples
from service.models.build import forward, input_channels, sample_size
from service.models.ema import EMAState, build_ema
from service.models.objective import build_noise_scheduler
from service.models.objective import loss as objective_loss
from service.models.objective import target as objective_target
from service.node.exits import exit_for_restart
from service.node.proc import process_identity
from service.train import state as keys
from service.train.denoiser import autocast_dtype, build_denoiser, build_optimizer
from service.train.guard import DivergenceGuard
from service.train.logging_sinks import TrainingLogs
from service.train.model_inputs import ModelInputs, split_batch
from service.train.progress import ProgressReporter
from service.train.restart_cost import ORDERED, STOPPED, RestartCostMeter, StepRecord
from service.train.state import (
    DataState,
    GradScalerState,
    LRSchedulerState,
    ModelState,
    OptimizerState,
    RNGState,
    TrainState,
    build_registry,
    warmup_cosine,
)
from service.train.step_timer import StepTimer

log = logging.getLogger(__name__)


class Trainer:
    """Builds every component from the config and runs the loop to ``train.max_steps``."""

    def __init__(self, cfg: Config, info: DistInfo, metrics: WorkerMetrics | None = None, *,
                 launch: LaunchEnv | None = None):
        self.cfg, self.info = cfg, info
        self.launch = launch if launch is not None else LaunchEnv.read()
        self.metrics = metrics or WorkerMetrics()
        check_batch_geometry(cfg.train.global_batch_size, info.world_size, cfg.train.grad_accum_steps)
        check_shared(cfg.checkpoint.url, info.world_size)
        self.local_batch = cfg.train.global_batch_size // info.world_size

        self.source = build_source(cfg)
        self.noise_scheduler = build_noise_scheduler(cfg.model)
        self.inputs = ModelInputs(cfg, info.device)
        side = sample_size(cfg.model)
        self.samples = TrainingSamples(
            self.source, cfg.run.seed, self.noise_scheduler.config.num_train_timesteps, cfg.data.hflip,
            training_labels(cfg, self.source),
            noise_shape=(input_channels(cfg.model), side, side) if self.inputs.vae is not None else None,
            captions=training_captions(cfg, self.source),
        )
        self.model, self.net = build_denoiser(cfg, info)
        self.optimizer = build_optimizer(cfg, self.model, info.device)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio),
        )
        self.autocast_dtype = autocast_dtype(cfg, info.device)
        self.scaler = torch.amp.GradScaler(
            info.device.type, enabled=self.autocast_dtype is torch.float16
        )
        self.ema = build_ema(self.model, cfg.train)
        self.train_state = TrainState()
        self.data_state = DataState()
        self.registry = build_registry(
            **{
                keys.MODEL: ModelState(self.net),
                keys.EMA: EMAState(self.ema, self.model),
                keys.OPTIMIZER: OptimizerState(self.net, self.optimizer),
                keys.LR_SCHEDULER: LRSchedulerState(self.lr_scheduler),
                keys.GRAD_SCALER: GradScalerState(self.scaler),
                keys.TRAIN_STATE: self.train_state,
                keys.DATA: self.data_state,
                keys.RNG: RNGState(info.rank, info.device),
            }
        )
        self.checkpointer = Checkpointer(
            cfg, info, self.registry, self.metrics.checkpoint, per_rank_keys=keys.PER_RANK_KEYS,
            can_read_state=lambda: bool(self.optimizer.state),
            fingerprint=fingerprint(cfg, data_length=len(self.source), data=data_identity(self.source)),
        )
        ck = cfg.checkpoint
        wait_until_reachable(self.checkpointer.storage, ck.single_writer, ck.storage_retry_s)
        self.logs = TrainingLogs(cfg, info, self.model, self.ema, self.metrics,
                                 should_stop=lambda: self._stop_signal is not None)
        self._stop_signal: int | None = None
        self._started = time.time()
        self._agent = process_identity(self.launch.agent_pid or os.getppid())  # torchrun's agent
        self.phase = "starting"
        self.restart_cost = RestartCostMeter(
            StepRecord(Path(cfg.checkpoint.memory_tier_dir or default_dir()), info.run_id, info.rank,
                           info.world_size)
            if info.run_id else None, info.rank, info.local_rank, self.checkpointer.group.gather_to_all)
        self.guard = DivergenceGuard(cfg, info, self.checkpointer, self.train_state, self.data_state,
                                     self.metrics, self.model, self.optimizer)
        self.step_timer = StepTimer(info.device, self.net)  # these two before the heartbeats, which report them
        self.heartbeats = self._start_heartbeats()
        self.probe = faults.StepProbe(info.rank, info.world_size, node=info.node)

    # -- heartbeats to the supervisor -----------------------------------------------------------
    def _start_heartbeats(self) -> HeartbeatSender | None:
        url = self.launch.supervisor_url or self.cfg.supervisor.url
        if not url:
            return None
        token = shared_token(self.cfg.supervisor.token, self.launch)
        if not token:
            raise UserError("a supervisor URL is set but no token: set supervisor.token or FTDIFF_TOKEN")
        # Under `ftdiff train`, a worker must not outlive its supervisor or its agent.
        launch = self.launch
        watch = [launch.supervisor_pid, launch.agent_pid] if launch.supervisor_pid is not None else []
        return HeartbeatSender(
            url, token, self.cfg.supervisor.heartbeat_interval_s, self._heartbeat,
            on_exit_order=self._leave_for_restart, watch_pids=watch, protected_pids=(launch.agent_pid,),
        ).start()

    def _leave_for_restart(self, generation: int | None, kill: list[int]) -> None:
        """The supervisor ordered this process out (a peer hangs or its node is gone), with a
        heartbeat's answer or with ``LEAVE_SIGNAL`` (generation None). First leave the last
        step every rank completed in the memory tier — the main thread waits in a collective
        with the hung peer, so the state is consistent there — then exit: the restart resumes
        at that step instead of the newest commit (a hang loses no step but the one in flight)."""
        self.restart_cost.left(ORDERED)
        self.checkpointer.leave_in_memory("restart ordered")
        exit_for_restart(generation, kill, protected=(self.launch.agent_pid,))

    def _request_stop(self, signum: int) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
        self.checkpointer.stop_probing()

    def _heartbeat(self) -> Heartbeat:
        info = self.info
        return Heartbeat(
            rank=info.rank, local_rank=info.local_rank, node=info.node, pid=os.getpid(),
            world_size=info.world_size, step=self.train_state.step, phase=self.phase,
            last_committed_step=self.checkpointer.last_committed_step,
            restart_count=info.restart_count, time=time.time(),
            metrics=metric_samples(self.metrics.registry), started=self._started,
            io_bytes=self.checkpointer.io_bytes + getattr(self.source, "bytes_read", 0),  # shard reads too
            compute_s=self.step_timer.mean_s, comm_s=self.step_timer.comm_mean_s, agent=self._agent,
            suspect_nodes=sorted(self.guard.suspect_nodes),
            recovery=self.restart_cost.report.as_dict() if self.restart_cost.report is not None else None,
        )

    # -- signals -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only set a flag: the current step finishes, then every rank agrees
        to stop at the same step and commits an emergency checkpoint."""

        def request_stop(signum: int, _frame: Any) -> None:
            self._request_stop(signum)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # torchrun SIGTERMs the survivors when a worker dies, maybe while this thread is stuck
        # in a collective: the memory tier then leaves the last completed step from a thread.
        # The local supervisor's restart order by signal goes through that thread too (the
        # Python handler only has to exist; it runs late or never while this thread is stuck).
        watched = self.checkpointer.watch_stop_signals(
            then={LEAVE_SIGNAL: lambda: self._leave_for_restart(None, [])})
        if watched:
            signal.signal(LEAVE_SIGNAL, lambda _signum, _frame: None)

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> int:
        self.phase = "loading"
        self.checkpointer.resume()
        self.restart_cost.resumed(self.train_state.step, self.checkpointer.resume_source,
                              self.checkpointer.is_restart)
        self.guard.started()
        self.phase = "training"
        self.logs.open(self.train_state.step)
        log.info(
            "training steps %d..%d: world size %d, global batch %d (%d per rank), %s",
            self.train_state.step, self.cfg.train.max_steps, self.info.world_size,
            self.cfg.train.global_batch_size, self.local_batch, self.info.device,
        )
        self.net.train()
        with ProgressReporter(self.info.is_main, self.train_state.step, self.cfg.train.max_steps) as progress:
            while True:  # once, plus once more after each rollback (bounded by its budget)
                code = self._train(progress)
                if code is not None:
                    return code

    def _train(self, progress: ProgressReporter) -> int | None:
        """Steps from the current state to the end; None when a rollback cut them short."""
        total, gb = self.cfg.train.max_steps, self.cfg.train.global_batch_size
        loader = build_loader(
            self.samples, self.data_state.position, max(0, total - self.train_state.step), gb,
            self.info.rank, self.info.world_size, self.cfg.data.num_workers, self.data_state.skips,
        )
        window_t, window_samples, window_wait = time.monotonic(), 0, 0.0
        for batch, waited in self._batches(loader):
            window_wait += waited
            self.metrics.train.data_wait.inc(waited)
            self.guard.batch_began(self.train_state.step + 1, self.data_state.position)
            loss, norm = self._train_step(batch)
            self._advance(gb)
            self.probe.after_step(self.train_state.step, batch["position"])
            self.probe.corrupt(self.train_state.step, self.model)
            # Weights, optimizer, LR, EMA and counters all at this step now (the update
            # began in before_update): it may be left in the memory tier. After the probe,
            # so an injected failure at a step is never skipped by resuming past it.
            self.checkpointer.update_done(self.train_state.step)
            self.restart_cost.step_done(self.train_state.step)
            if "bad_image" in batch:  # data.on_bad_image = "skip": replacements, counted
                self.metrics.train.bad_images.inc(int(batch["bad_image"].sum()))
            global_loss, stop, busy = self._agree(loss)
            step = self.train_state.step
            self.metrics.train.step.set(step)
            window_samples += gb
            if step % self.cfg.train.log_every == 0 or step == total:
                now = time.monotonic()
                rate = window_samples / max(now - window_t, 1e-9)
                wait_share = window_wait / max(now - window_t, 1e-9)
                window_t, window_samples, window_wait = now, 0, 0.0
                self._report(progress, step, global_loss, rate, wait_share)
            progress.advance(step, global_loss)
            if stop:
                return self._emergency_stop(step)
            verdict = self.guard.judge(step, global_loss, norm)
            if verdict is not None:  # every rank, at the same step
                self.phase = "loading"
                self.guard.roll_back(verdict)
                self.phase = "training"
                return None
            if step < total:  # the last step's grid comes after the final commit
                self.logs.maybe_sample(step)  # rendered in the background
            # Visibly a storage phase while it blocks (a slow or unreachable store is not
            # a hang; see service.supervisor.monitor).
            self.phase = "checkpointing"
            self.checkpointer.save(step, self.train_state.samples_seen, busy_anywhere=busy)
            self.phase = "training"
            if self.cfg.train.step_sleep_s:
                time.sleep(self.cfg.train.step_sleep_s)
        return self._finish()

    def _batches(self, loader: Any) -> Any:
        """(batch, seconds this rank waited for it: what the loader fails to keep ahead of).
        While it waits, the phase is "reading": reading data is storage time, where the bytes
        of shard reads count as progress (a slow shard read is not a hang)."""
        batches = iter(loader)
        while True:
            asked = time.monotonic()
            self.phase = "reading"
            batch = next(batches, None)
            self.phase = "training"
            if batch is None:
                return
            yield batch, time.monotonic() - asked

    def _train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float | None]:
        """One optimizer step on this rank's share of the global batch, in ``grad_accum_steps``
        micro-batches (synchronised after the last); (its loss, the global gradient norm)."""
        accum = self.cfg.train.grad_accum_steps
        total = torch.zeros((), device=self.info.device)
        for i, micro in enumerate(split_batch(batch, accum)):
            last = i == accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self.step_timer.section():  # this rank's own compute: the straggler signal
                    self.probe.slow_rank()
                    loss = self.probe.loss(self.train_state.step + 1, self._micro_loss(micro)) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.step_timer.step_done()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.checkpointer.before_update()  # an async snapshot may still be copying the weights
        # DDP averaged the gradients, so every rank holds the same norm and takes the same
        # decision: a NaN/Inf loss or gradient anywhere skips this update everywhere (the data
        # position still advances). With fp16 the grad scaler skips such steps itself.
        finite = self.scaler.is_enabled() or bool(torch.isfinite(norm))
        if finite:
            self.scaler.step(self.optimizer)
        else:
            self.metrics.train.nonfinite_steps.inc()
            log.warning("step %d: non-finite loss or gradients (norm %s): update skipped on every rank",
                        self.train_state.step + 1, float(norm))
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if finite:
            self.ema.step(self.model.parameters())
        # With fp16 an overflow is the grad scaler's to handle (it skips and lowers the scale):
        # then there is no gradient norm to judge.
        return total, (float(norm) if not self.scaler.is_enabled() or bool(torch.isfinite(norm)) else None)

    def _micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.info.device
        noise = batch["noise"].to(device, non_blocking=True)
        timesteps = batch["timestep"].to(device, non_blocking=True)
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        images = self.inputs.images(batch, autocast)  # or the VAE's latents of them
        cond = self.inputs.condition(batch)
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        with autocast:
            prediction = forward(self.cfg.model, self.net, noisy, timesteps, cond)
        wanted = objective_target(self.noise_scheduler, images, noise, timesteps)
        return objective_loss(self.noise_scheduler, prediction.float(), wanted, timesteps, self.cfg.train.snr_gamma)

    def _advance(self, global_batch: int) -> None:
        self.train_state.step += 1
        self.train_state.samples_seen += global_batch
        self.data_state.position = self.data_state.skips.next_start(self.data_state.position + global_batch, global_batch)
        self.train_state.epoch = self.data_state.position // len(self.source)

    def _agree(self, loss: torch.Tensor) -> tuple[float, bool, bool]:
        """One small all-reduce per step gives every rank the same view of: the global mean
        loss, whether any rank was asked to stop, and whether any rank's save is still writing."""
        flags = torch.tensor([float(self._stop_signal is not None), float(self.checkpointer.busy)], device=loss.device)
        packed = torch.cat([loss.float().reshape(1), flags])
        if dist.is_initialized():
            dist.all_reduce(packed)
            packed[0] /= self.info.world_size
        return float(packed[0]), bool(packed[1] > 0), bool(packed[2] > 0)

    def _report(self, progress: ProgressReporter, step: int, loss: float, rate: float, wait_share: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.metrics.train.step.set(step)
        self.metrics.train.loss.set(loss)
        self.metrics.train.samples_per_second.set(rate)
        self.metrics.train.data_wait_share.set(wait_share)
        gb = self.cfg.train.global_batch_size
        self.metrics.train.expected_checkpoint_interval.set(self.cfg.checkpoint.every_steps * gb / max(rate, 1e-9))
        progress.log(step, loss, lr, rate)
        self.logs.step(step, loss, lr, rate, data_wait_share=wait_share)

    def _finish(self) -> int:
        step = self.train_state.step
        self.phase = "checkpointing"
        self.checkpointer.save(step, self.train_state.samples_seen, last_step=True)
        log.info("done: step %d committed", step)
        self.restart_cost.finished()
        # "done" before the last grid: the work is committed, so neither a slow render nor a
        # SIGTERM now (which ends the wait for it) can cost the run anything.
        self.phase = "done"
        self.logs.maybe_sample(step, final=True)
        return EXIT_OK

    def _emergency_stop(self, step: int) -> int:
        t0 = time.monotonic()
        self.phase = "stopping"
        log.warning("stop requested (signal %s): emergency checkpoint at step %d", self._stop_signal, step)
        self.checkpointer.save(step, self.train_state.samples_seen, emergency=True)
        self.restart_cost.left(STOPPED)
        elapsed = time.monotonic() - t0
        if elapsed > self.cfg.checkpoint.grace_s:
            log.warning("emergency checkpoint took %.1fs, over checkpoint.grace_s", elapsed)
        self.phase = "done"
        return EXIT_PREEMPTED

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.logs.close(drain=self.phase == "done" and self._stop_signal is None)  # bounded; never raises
            if self.heartbeats is not None:
                self.heartbeats.stop()
