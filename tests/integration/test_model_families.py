"""Every guarantee for every model family: a class-conditional DiT, a class-conditional UNet
(v-prediction, Min-SNR) and a text-conditional latent UNet (Stable Diffusion's layout) under
real torchrun jobs — kill -9 resumes bitwise equal (object store and memory tier), a resume at
another world size with accumulation continues at the exact sample, a changed architecture is
refused naming the keyword, and the checkpoints sample per class or prompt and export as the
family's diffusers pipeline."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.helpers import (
    BASELINE_STEPS,
    assert_bitwise_equal,
    finish,
    losses,
    popen,
    run,
    shared_once,
    single_cmd,
    tiny_text_encoder,
    tiny_vae,
    torchrun_cmd,
    trace_lines,
    traced_run,
    wait_for_step,
    weights,
    why,
    worker_pids,
)

FAMILIES = {
    # Latent diffusion: 8x8 latents of a tiny VAE (16x16 images).
    "dit": ['model.family="dit"', 'model.conditioning="class"', "model.num_classes=3", "model.sample_size=8"],
    "unet": ['model.conditioning="class"', "model.num_classes=3", 'model.prediction_type="v_prediction"',
             "train.snr_gamma=5.0", 'model.beta_schedule="squaredcos_cap_v2"'],
    # Captions of the shapes ("a red circle") through a tiny CLIP text encoder, on latents.
    "unet-cond": ['model.family="unet-cond"', 'model.conditioning="text"', "model.sample_size=8",
                  "model.cond_dropout=0.2"],
}


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:  # one path for every xdist worker: it is in the shared baselines' identity
    return shared_once(tmp_path_factory, "tiny-vae", lambda folder: str(tiny_vae(folder)))


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> str:
    return shared_once(tmp_path_factory, "tiny-clip", lambda folder: str(tiny_text_encoder(folder)))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_baseline(request, tmp_path_factory, vae, text_encoder):
    """(family, its settings, the url and losses of an uninterrupted 2-rank run: 12 steps,
    checkpoint every 4)."""
    family = request.param
    settings = FAMILIES[family] + ([f'model.vae="{vae}"'] if family != "unet" else [])
    settings += [f'model.text_encoder="{text_encoder}"'] if family == "unet-cond" else []

    def make(folder):  # type: ignore[no-untyped-def]
        res = run(torchrun_cmd(settings + [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4",
                                           f'checkpoint.url="{folder}"']))
        assert res.returncode == 0, why(res)
        return str(folder), losses(res.stderr)

    url, reference = shared_once(tmp_path_factory, f"family-{family}", make)
    return family, settings, url, reference


@pytest.mark.timeout(300)
def test_kill9_resumes_bitwise_equal(family_baseline, tmp_path):
    """Some families resume from the object store, the others from the memory tier (both paths
    are family-independent; each family takes one to keep the suite short)."""
    family, settings, ref_url, ref_loss = family_baseline
    memory_tier = family != "dit"
    dirs = traced_run(tmp_path)
    proc = popen(torchrun_cmd(settings + [
        f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", dirs.url_arg, "train.step_sleep_s=0.25",
        f"checkpoint.memory_tier={'true' if memory_tier else 'false'}"], max_restarts=2),
        env={**dirs.env, "FTDIFF_RUN_ID": f"families-{family}-{memory_tier}-{os.getpid()}"})
    wait_for_step(dirs.trace, 6, proc)
    os.kill(worker_pids(dirs.trace)[1], signal.SIGKILL)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert_bitwise_equal(weights(ref_url, "model"), weights(str(dirs.url), "model"))
    assert_bitwise_equal(weights(ref_url, "ema"), weights(str(dirs.url), "ema"))
    got = losses(err)
    assert all(got[step] == ref_loss[step] for step in got)


@pytest.mark.timeout(300)
def test_another_world_size_with_accumulation_continues_at_the_exact_sample(family_baseline, tmp_path):
    """Preempted (SIGTERM: an emergency commit) after half the run at 2 ranks, then finished at
    1 rank x 2 micro-batches: the same global batches, sample for sample, each exactly once, and
    the same weights within float tolerance."""
    family, settings, ref_url, _ = family_baseline
    dirs = traced_run(tmp_path)
    common = settings + [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", dirs.url_arg]
    proc = popen(torchrun_cmd(common + ["train.step_sleep_s=0.2"]), env=dirs.env)
    wait_for_step(dirs.trace, BASELINE_STEPS // 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code != 0, "the first half should have been preempted"
    rest = run(single_cmd(common + ["train.grad_accum_steps=2"]), env=dirs.env)
    assert rest.returncode == 0, why(rest)
    lines = trace_lines(dirs.trace)
    seen = sorted((line["step"], line["rank"]) for line in lines)
    assert len(seen) == len(set(seen)), "a step was trained twice"
    positions = sorted(p for line in lines for p in line["positions"])
    assert positions == list(range(BASELINE_STEPS * 8)), "every sample exactly once"
    assert {line["world_size"] for line in lines} == {1, 2}
    a, b = weights(ref_url, "model"), weights(str(dirs.url), "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=5e-5)


@pytest.mark.timeout(120)
def test_a_changed_architecture_is_refused_naming_the_keyword(family_baseline, tmp_path):
    family, settings, ref_url, _ = family_baseline
    change = {"dit": "model.arch.num_layers=3", "unet-cond": "model.arch.attention_head_dim=4"}.get(
        family, "model.arch.layers_per_block=2")
    res = run(single_cmd(settings + [f"train.max_steps={BASELINE_STEPS + 2}", f'checkpoint.url="{ref_url}"',
                                              change, "checkpoint.memory_tier=false"]))
    assert res.returncode == 2, why(res)
    assert f"model.architecture.{change.split('.')[2].split('=')[0]}" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.timeout(120)
def test_the_checkpoint_samples_per_class_and_exports_its_weights(family_baseline, tmp_path):
    from tests.helpers import ftdiff_inprocess as ftdiff

    family, settings, ref_url, _ = family_baseline
    grid = tmp_path / "grid.png"
    condition = ["--prompt", "a red circle"] if family == "unet-cond" else ["--class", "1"]
    res = ftdiff("sample", ref_url, "--out", str(grid), "--n", "4", "--steps", "3", *condition,
                 "--guidance-scale", "2")
    assert res.returncode == 0, res.stderr
    assert grid.stat().st_size > 0
    bad = ftdiff("sample", ref_url, "--out", str(grid), "--n", "1", "--steps", "2", "--class", "7")
    wanted = "not class-conditional" if family == "unet-cond" else "classes 0..2"
    assert bad.returncode == 2 and wanted in bad.stderr, bad.stderr
    out = tmp_path / "w.safetensors"
    assert ftdiff("export", ref_url, "--format", "safetensors", "--out", str(out)).returncode == 0
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(weights(ref_url, "model"))
    pipe_dir = tmp_path / "pipe"
    exported = ftdiff("export", ref_url, "--format", "diffusers", "--out", str(pipe_dir))
    if family == "unet":  # class-conditional pixel space: no diffusers pipeline takes it
        assert exported.returncode == 2 and "--format safetensors" in exported.stderr
        return
    assert exported.returncode == 0, exported.stderr
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
    if family == "unet-cond":
        _samples_as_ftdiff_does(pipe, ref_url)
        return
    assert type(pipe).__name__ == "DiTPipeline"
    images = pipe(class_labels=[0, 2], num_inference_steps=2, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def _samples_as_ftdiff_does(pipe, ref_url: str) -> None:
    """The exported text-to-image pipeline draws, for a prompt, what ``ftdiff sample --prompt``
    draws with the same seed, steps and guidance: the same prompt encoding, UNet and VAE."""
    from service.checkpoint.refs import resolve
    from service.sample import generate, model_from_state
    from service.weights import load_weights

    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pipe(["a blue square"] * 2, num_inference_steps=3, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    cfg, state = load_weights(resolve(ref_url), "ema")
    ours = generate(model_from_state(cfg, state), cfg, 2, seed=5, steps=3, prompt="a blue square", guidance_scale=2.0)
    assert out.shape == ours.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ours, rtol=0, atol=1e-4)
