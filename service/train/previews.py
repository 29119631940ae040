"""Sample grids from the EMA weights while training runs, rendered off the training path.

At a due step rank 0 copies the EMA weights into a private UNet (one device-to-device copy on
the training thread, so the grid shows exactly that step's weights), and a background thread
renders the grid with ``service.sample.generate`` and writes the PNG. The training thread never
waits for a render: at most one runs, and one that comes due while the previous is still
rendering is skipped (counted). The last step's grid is the exception: the trainer waits for it
(bounded) so that every finished run leaves one.

Rendering never touches training state: the copy is the only read of the EMA, the noise comes
from a local ``torch.Generator`` (``generate``), and building the private UNet does not consume
the global RNG (``build_model`` forks it) — a run with grids is bitwise the same as one without.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from service.config import Config
from service.models.build import build_model
from service.sample import generate, save_grid

log = logging.getLogger(__name__)

# How long the end of a run waits for its last grid, and an interrupted run for a periodic one
# (the emergency checkpoint is already committed then; this only keeps the exit tidy).
FINAL_TIMEOUT_S = 120.0
ABANDON_TIMEOUT_S = 5.0

Generate = Callable[..., torch.Tensor]
OnGrid = Callable[[int, Path], None]


def grid_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:06d}.png"


class SampleRenderer:
    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        ema: EMAModel,
        out_dir: Path,
        device: torch.device,
        *,
        on_grid: OnGrid | None = None,
        render: Generate = generate,
        should_stop: Callable[[], bool] = lambda: False,
    ):
        """``model``: the training UNet (its buffers, which the EMA does not average);
        ``on_grid(step, png)``: called on the render thread after each PNG is written (the
        TensorBoard image); ``render``: ``service.sample.generate`` (tests pass a slower one)."""
        self.cfg, self.model, self.ema, self.out_dir, self.device = cfg, model, ema, out_dir, device
        self.on_grid, self.render = on_grid, render
        # A stop request (SIGTERM) ends every wait for a render at once: waits happen only
        # after the final commit, and a preempted pod must not spend its grace period here.
        self.should_stop = should_stop
        self.every = cfg.logging.sample_every
        self.rendered = 0
        self.skipped = 0
        self.disabled = False
        self._unet: torch.nn.Module | None = None
        self._thread: threading.Thread | None = None
        self._final = False
        self._stream: torch.cuda.Stream | None = None

    def maybe_render(self, step: int, *, final: bool = False) -> None:
        """Start a render of this step's EMA weights if one is due (every ``sample_every``
        steps, and the last step); returns at once."""
        if self.disabled or not (final or step % self.every == 0):
            return
        if self._busy():
            if not final:
                self.skipped += 1
                log.debug("samples: step %d skipped, the previous grid is still rendering (%d skipped so far)",
                          step, self.skipped)
                return
            self._wait(FINAL_TIMEOUT_S)
            if self._busy():
                log.warning("samples: no grid for the last step %d, the previous one is still rendering", step)
                return
        try:
            unet, ready = self._copy_ema()
        except Exception as e:  # noqa: BLE001 — a grid must never cost the run
            self._disable(step, e)
            return
        self._final = final
        self._thread = threading.Thread(target=self._run, args=(step, unet, ready), name="samples", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Wait for the last step's grid (bounded); an interrupted run waits only briefly."""
        if self._busy():
            timeout = FINAL_TIMEOUT_S if self._final else ABANDON_TIMEOUT_S
            self._wait(timeout)
            if self._busy():
                log.warning("samples: leaving without the grid still rendering after %.0fs", timeout)
        if self.rendered or self.skipped:
            log.info("samples: %d grids in %s, %d skipped while one was rendering",
                     self.rendered, self.out_dir, self.skipped)

    # -- internals ---------------------------------------------------------------------------
    def _wait(self, timeout: float) -> None:
        """Join the render thread for up to ``timeout`` s, or until a stop is requested."""
        deadline = time.monotonic() + timeout
        while self._busy() and not self.should_stop() and time.monotonic() < deadline:
            assert self._thread is not None
            self._thread.join(min(0.2, max(0.0, deadline - time.monotonic())))

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _copy_ema(self) -> tuple[torch.nn.Module, torch.cuda.Event | None]:
        if self._unet is None:
            # Built once, on first use; build_model forks the RNG, so the training RNG is untouched.
            self._unet = build_model(self.cfg.model, self.cfg.run.seed).to(self.device).requires_grad_(False)
        unet = self._unet
        with torch.no_grad():
            buffers = dict(self.model.named_buffers())
            for name, buf in unet.named_buffers():
                buf.copy_(buffers[name])
            self.ema.copy_to(unet.parameters())
        ready = None
        if self.device.type == "cuda":
            # The copy is queued on the training stream; the render stream waits for it there.
            ready = torch.cuda.Event()
            ready.record()
        return unet, ready

    def _run(self, step: int, unet: torch.nn.Module, ready: torch.cuda.Event | None) -> None:
        try:
            with self._render_stream(ready):
                images = self.render(unet, self.cfg, self.cfg.logging.sample_n, seed=self.cfg.run.seed,
                                     steps=self.cfg.logging.sample_steps)
            path = save_grid(images.float().cpu(), grid_path(self.out_dir, step))
            self.rendered += 1
            log.info("samples: step %d grid written to %s", step, path)
            if self.on_grid is not None:
                self.on_grid(step, path)
        except Exception as e:  # noqa: BLE001 — a bad directory or full disk must not stop training
            self._disable(step, e)

    @contextlib.contextmanager
    def _render_stream(self, ready: torch.cuda.Event | None) -> Iterator[None]:
        """On CUDA, a side stream of the training device (the current device is per thread),
        so the render's kernels can overlap training's instead of queueing between them."""
        if ready is None:
            yield
            return
        with torch.cuda.device(self.device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_event(ready)
            with torch.cuda.stream(self._stream):
                yield

    def _disable(self, step: int, err: BaseException) -> None:
        if not self.disabled:
            self.disabled = True
            log.warning("samples: rendering the grid of step %d failed (%s: %s); no more grids this run",
                        step, type(err).__name__, err)
