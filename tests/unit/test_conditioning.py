"""Class conditioning, objectives and gradient accumulation, in one process (the multi-process
guarantees per family are in tests/integration/test_model_families.py)."""

from __future__ import annotations

import pytest
import torch

from service.config import load_config
from service.data.stream import GlobalOrder, Labels, TrainingSamples, build_source, training_labels
from service.errors import UserError
from service.models import objective
from tests.helpers import train_in_process

pytestmark = pytest.mark.timeout(120)
CLASS = ['model.conditioning="class"', "model.num_classes=3"]


def test_the_shapes_label_is_the_shape_it_draws():
    cfg = load_config(None, ["data.epoch_size=40"])
    source = build_source(cfg)
    assert source.num_classes == 3
    # One pixel tells a circle from a square: the corners of its bounding box.
    labels = [source.label(i) for i in range(40)]
    assert set(labels) == {0, 1, 2}
    again = build_source(cfg)
    assert labels == [again.label(i) for i in range(40)]  # a pure function of (seed, index)


def test_a_folder_takes_its_classes_from_first_level_subfolders(tmp_path):
    from PIL import Image

    for name in ("dog", "cat", "cat/kitten"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / name / "a.png")
    cfg = load_config(None, ['data.kind="folder"', f'data.url="{tmp_path}"', 'data.resize="resize"', *CLASS])
    source = build_source(cfg)
    assert source.classes == ["cat", "dog"] and source.num_classes == 2
    assert [source.label(i) for i in range(len(source))] == [0, 0, 1]  # cat/a, cat/kitten/a, dog/a
    Image.new("RGB", (20, 20)).save(tmp_path / "loose.png")
    loose = build_source(cfg)
    with pytest.raises(UserError, match="not in a subfolder"):
        [loose.label(i) for i in range(len(loose))]


def test_too_few_classes_in_the_config_is_named():
    cfg = load_config(None, ['model.conditioning="class"', "model.num_classes=2"])
    with pytest.raises(UserError, match="the data has 3 classes but model.num_classes = 2"):
        training_labels(cfg, build_source(cfg))
    assert training_labels(load_config(None, []), build_source(load_config(None, []))) is None


def test_label_dropout_is_a_pure_function_of_the_sample_and_leaves_the_noise_alone():
    cfg = load_config(None, ["data.epoch_size=200", *CLASS, "model.cond_dropout=0.25"])
    source = build_source(cfg)
    plain = TrainingSamples(source, 0, 1000, True)
    labelled = TrainingSamples(source, 0, 1000, True, training_labels(cfg, source))
    labelled_again = TrainingSamples(source, 0, 1000, True, Labels(null=3, dropout=0.25))
    dropped = 0
    for position in range(400):  # two epochs
        a, b, c = plain[position], labelled[position], labelled_again[position]
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["image"], b["image"])
        assert int(b["label"]) == int(c["label"])
        if int(b["label"]) == 3:
            dropped += 1
        else:
            assert int(b["label"]) == source.label(int(b["source_index"]))
    assert 60 < dropped < 140  # ~25% of 400


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_has_its_target_and_min_snr_weights(prediction_type):
    cfg = load_config(None, [f'model.prediction_type="{prediction_type}"', 'model.beta_schedule="squaredcos_cap_v2"'])
    scheduler = objective.build_noise_scheduler(cfg.model)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 10, 500, 999])
    wanted = objective.target(scheduler, images, noise, t)
    expected = {"epsilon": noise, "sample": images,
                "v_prediction": scheduler.get_velocity(images, noise, t)}[prediction_type]
    assert torch.equal(wanted, expected)
    prediction = wanted + 0.1
    plain = objective.loss(scheduler, prediction, wanted, t, None)
    assert torch.allclose(plain, torch.tensor(0.01))
    weighted = objective.loss(scheduler, prediction, wanted, t, 5.0)
    # Every sample's error is 0.01; Min-SNR only scales each by its weight.
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    w = {"epsilon": torch.clamp(snr, max=5) / snr, "v_prediction": torch.clamp(snr, max=5) / (snr + 1),
         "sample": torch.clamp(snr, max=5)}[prediction_type]
    assert torch.allclose(weighted, (0.01 * w).mean(), rtol=1e-4)


def test_accumulation_keeps_the_global_batch_and_its_math(tmp_path):
    whole = train_in_process(tmp_path / "a", [])
    pieces = train_in_process(tmp_path / "b", ["train.grad_accum_steps=4"])
    # Gradients summed in another order; Adam's normalisation magnifies that for parameters
    # whose gradients are tiny. Still well under one step's update (lr 2e-4).
    for key in whole:
        torch.testing.assert_close(whole[key], pieces[key], rtol=1e-4, atol=5e-5)
    with pytest.raises(UserError, match="grad_accum_steps = 1 x 3 = 3"):
        train_in_process(tmp_path / "c", ["train.grad_accum_steps=3"])  # 8 samples in 3 pieces


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_a_class_conditional_model_trains_and_samples_each_class(family, tmp_path):
    from service.models.build import build_model
    from service.sample import generate

    state = train_in_process(tmp_path, [f'model.family="{family}"', *CLASS, 'model.prediction_type="v_prediction"',
                                "train.snr_gamma=5.0"])
    cfg = load_config(None, [f'model.family="{family}"', *CLASS, 'model.prediction_type="v_prediction"'])
    model = build_model(cfg.model, 0)
    model.load_state_dict(state)
    one = generate(model, cfg, 2, seed=1, steps=3, class_label=2, guidance_scale=2.0)
    assert one.shape == (2, 3, 16, 16) and 0 <= float(one.min()) and float(one.max()) <= 1
    assert torch.equal(one, generate(model, cfg, 2, seed=1, steps=3, class_label=2, guidance_scale=2.0))
    with pytest.raises(UserError, match="classes 0..2"):
        generate(model, cfg, 1, steps=2, class_label=3)
    with pytest.raises(UserError, match="not class-conditional"):
        generate(build_model(load_config(None, []).model, 0), load_config(None, []), 1, steps=2, class_label=0)


def test_a_changed_architecture_is_refused_naming_the_keyword():
    from service.checkpoint.identity import differences, fingerprint

    saved = fingerprint(load_config(None, []))
    hard, _ = differences(saved, fingerprint(load_config(None, ["model.arch.layers_per_block=2"])))
    assert hard == ["model.architecture.layers_per_block: 1 in the checkpoint, 2 now"]
    import json

    assert differences(json.loads(json.dumps(saved)), fingerprint(load_config(None, []))) == ([], [])


def test_global_order_is_unchanged_by_conditioning():
    assert torch.equal(GlobalOrder(10, 0).permutation(0), GlobalOrder(10, 0).permutation(0))


def test_latent_diffusion_trains_on_the_vaes_latents_and_samples_images(tmp_path):
    from service.models.build import build_model, image_size, model_kwargs
    from service.sample import generate
    from tests.helpers import tiny_vae

    vae = tiny_vae(tmp_path / "vae")
    latent = ['model.family="dit"', *CLASS, "model.sample_size=8", f'model.vae="{vae}"']
    cfg = load_config(None, latent)
    assert image_size(cfg.model) == 16 and model_kwargs(cfg.model)["in_channels"] == 4
    assert build_source(cfg).image(0).shape == (3, 16, 16)  # images at 16, latents at 8
    state = train_in_process(tmp_path / "run", latent)
    model = build_model(cfg.model, 0)
    model.load_state_dict(state)
    images = generate(model, cfg, 2, steps=2, class_label=1)
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="model.vae = .*no such folder"):
        image_size(load_config(None, ['model.family="dit"', *CLASS, f'model.vae="{tmp_path / "nothing"}"']).model)


def test_an_older_checkpoint_counts_as_unet_unconditional_epsilon():
    """Fingerprints from before model.family and the objective settings existed meant the
    defaults: a resume of one under another family or objective is refused, not waved through."""
    from service.checkpoint.identity import differences, fingerprint

    old = {k: v for k, v in fingerprint(load_config(None, [])).items()
           if not k.startswith("model.architecture.") and k not in (
               "model.family", "model.conditioning", "model.num_classes", "model.beta_schedule",
               "model.prediction_type", "model.init_from", "model.vae", "model.cond_dropout", "train.snr_gamma")}
    assert differences(old, fingerprint(load_config(None, []))) == ([], [])
    hard, _ = differences(old, fingerprint(load_config(None, ['model.family="dit"', *CLASS])))
    assert "model.family: 'unet' in the checkpoint, 'dit' now" in hard
    hard, _ = differences(old, fingerprint(load_config(None, ['model.prediction_type="v_prediction"'])))
    assert hard == ["model.prediction_type: 'epsilon' in the checkpoint, 'v_prediction' now"]


def test_another_vae_under_the_same_path_is_another_run(tmp_path):
    from diffusers import AutoencoderKL

    from service.checkpoint.identity import differences, fingerprint
    from service.models import latent
    from tests.helpers import tiny_vae

    vae = tiny_vae(tmp_path / "vae")
    overrides = ['model.family="dit"', *CLASS, "model.sample_size=8", f'model.vae="{vae}"']
    saved = fingerprint(load_config(None, overrides))
    model = AutoencoderKL.from_pretrained(str(vae))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # retrained, saved over the old one
    model.save_pretrained(str(vae))
    latent.vae_digest.cache_clear()
    hard, _ = differences(saved, fingerprint(load_config(None, overrides)))
    assert len(hard) == 1 and hard[0].startswith("model.vae_weights:")


def test_the_same_vae_in_another_folder_is_the_same_run_and_another_one_is_not(tmp_path):
    """The digest is the VAE's identity: a copied folder (a cache baked into an image, a volume
    mounted elsewhere) resumes with a warning; other weights at the new path are refused."""
    import shutil

    from diffusers import AutoencoderKL

    from service.checkpoint.identity import differences, fingerprint
    from service.models import latent
    from tests.helpers import tiny_vae

    vae = tiny_vae(tmp_path / "vae")
    base = ['model.family="dit"', *CLASS, "model.sample_size=8"]
    saved = fingerprint(load_config(None, [*base, f'model.vae="{vae}"']))
    moved = tmp_path / "mounted" / "vae"
    shutil.copytree(vae, moved)
    hard, soft = differences(saved, fingerprint(load_config(None, [*base, f'model.vae="{moved}"'])))
    assert hard == [] and [line.split(":")[0] for line in soft] == ["model.vae"]

    model = AutoencoderKL.from_pretrained(str(moved))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(str(moved))
    latent.vae_digest.cache_clear()
    hard, _ = differences(saved, fingerprint(load_config(None, [*base, f'model.vae="{moved}"'])))
    assert sorted(line.split(":")[0] for line in hard) == ["model.vae", "model.vae_weights"]


def test_adding_a_vae_on_resume_is_refused(tmp_path):
    from service.checkpoint.identity import differences, fingerprint
    from tests.helpers import tiny_vae

    vae = tiny_vae(tmp_path / "vae")
    base = ['model.family="dit"', *CLASS, "model.sample_size=8"]
    hard, _ = differences(fingerprint(load_config(None, base)),
                          fingerprint(load_config(None, [*base, f'model.vae="{vae}"'])))
    assert "model.vae" in [line.split(":")[0] for line in hard]
