"""Text conditioning in one process: captions from every source, caption dropout, the frozen
text encoder and its identity, the config's rules and sampling's arguments (the multi-process
guarantees are in tests/integration/test_model_families.py)."""

from __future__ import annotations

import pytest
import torch

from service.config import load_config
from service.data.stream import Captions, TrainingSamples, build_source, training_captions
from service.errors import UserError
from tests.helpers import tiny_text_encoder, train_in_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return str(tiny_text_encoder(tmp_path_factory.mktemp("clip")))


def text(clip: str, *extra: str) -> list[str]:
    return ['model.family="unet-cond"', 'model.conditioning="text"', f'model.text_encoder="{clip}"', *extra]


def test_the_config_pairs_text_conditioning_with_a_text_encoder(clip):
    with pytest.raises(UserError, match="needs model.text_encoder"):
        load_config(None, ['model.family="unet-cond"', 'model.conditioning="text"'])
    with pytest.raises(UserError, match="model.text_encoder is set but model.conditioning = 'none'"):
        load_config(None, [f'model.text_encoder="{clip}"'])
    with pytest.raises(UserError, match="family 'unet-cond' supports text"):
        load_config(None, ['model.family="unet-cond"'])
    with pytest.raises(UserError, match="family 'unet' supports none, class"):
        load_config(None, ['model.conditioning="text"', f'model.text_encoder="{clip}"'])


def test_the_shapes_caption_names_the_colour_and_the_shape_it_draws():
    cfg = load_config(None, ["data.epoch_size=60"])
    source = build_source(cfg)
    for i in range(60):
        colour, shape = source.caption(i).split()[1:]
        assert shape == source.CLASSES[source.label(i)]
        rgb = source.PALETTE[source.COLOURS.index(colour)]
        image = (source.image(i) + 1) / 2
        has_it = ((image - rgb[:, None, None]).abs().amax(dim=0) < 1e-5).any()  # some pixel is that colour
        assert has_it, (i, source.caption(i))


def test_a_folder_takes_its_captions_from_the_txt_beside_each_image(tmp_path, clip):
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a red square \n")
    (tmp_path / "c.txt").write_bytes("ein rotes Quadrat \xff".encode("latin-1"))
    cfg = load_config(None, ['data.kind="folder"', f'data.url="{tmp_path}"', 'data.resize="resize"', *text(clip)])
    source = build_source(cfg)
    assert source.num_captioned == 2
    assert [source.caption(i) for i in range(3)] == ["a red square", "", "ein rotes Quadrat \ufffd"]
    (tmp_path / "a.txt").unlink()
    (tmp_path / "c.txt").unlink()
    with pytest.raises(UserError, match="needs captioned data.*a .txt of the same name"):
        training_captions(cfg, build_source(cfg))


def test_caption_dropout_is_a_pure_function_of_the_sample_and_leaves_the_rest_alone(clip):
    cfg = load_config(None, ["data.epoch_size=200", *text(clip, "model.cond_dropout=0.25")])
    source = build_source(cfg)
    plain = TrainingSamples(source, 0, 1000, True)
    captioned = TrainingSamples(source, 0, 1000, True, captions=training_captions(cfg, source))
    again = TrainingSamples(source, 0, 1000, True, captions=Captions(dropout=0.25))
    dropped = 0
    for position in range(400):
        a, b, c = plain[position], captioned[position], again[position]
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["image"], b["image"])
        assert b["caption"] == c["caption"]
        source_index = int(b["source_index"])
        assert b["caption"] in ("", source.caption(source_index))
        dropped += b["caption"] == ""
    assert 60 <= dropped <= 140  # ~25% of 400


def test_the_encoder_sets_the_cross_attention_width_and_encodes_as_the_pipeline_does(clip):
    from service.models.build import model_kwargs
    from service.models.text import load_text_encoder, text_geometry

    cfg = load_config(None, text(clip))
    assert model_kwargs(cfg.model)["cross_attention_dim"] == 32
    assert text_geometry(clip).max_length == 16
    encoder = load_text_encoder(clip)
    states = encoder(["a red circle", "", "a red circle"])
    assert states.shape == (3, 16, 32)
    assert torch.equal(states[0], states[2]) and not torch.equal(states[0], states[1])
    assert not any(p.requires_grad for p in encoder.model.parameters())  # frozen


def test_a_missing_or_broken_text_encoder_is_a_user_error_naming_the_setting(tmp_path, clip):
    from service.models.build import check_geometry

    cfg = load_config(None, text(str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="model.text_encoder = .*nowhere"):
        check_geometry(cfg.model)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="model.text_encoder"):
        check_geometry(load_config(None, text(str(tmp_path / "broken"))).model)


def test_another_text_encoder_under_the_same_path_is_another_run(tmp_path):
    import shutil

    from service.checkpoint.identity import differences, fingerprint
    from service.models import text as text_module

    clip = tiny_text_encoder(tmp_path / "clip")
    saved = fingerprint(load_config(None, text(str(clip))))
    # Another tokenizer (same encoder): captions map to other tokens, so it is other math too.
    other = tiny_text_encoder(tmp_path / "other")
    tokenizer = (other / "tokenizer" / "tokenizer.json")
    tokenizer.write_text(tokenizer.read_text().replace('"a":', '"A":'))
    shutil.rmtree(clip / "tokenizer")
    shutil.copytree(other / "tokenizer", clip / "tokenizer")
    text_module.text_encoder_digest.cache_clear()
    hard, _ = differences(saved, fingerprint(load_config(None, text(str(clip)))))
    assert len(hard) == 1 and hard[0].startswith("model.text_encoder_weights:")


def test_a_text_model_trains_and_accumulation_keeps_its_math(tmp_path, clip):
    overrides = text(clip, "model.cond_dropout=0.3")
    once = train_in_process(tmp_path / "a", overrides)
    accumulated = train_in_process(tmp_path / "b", [*overrides, "train.grad_accum_steps=2"])
    for key in once:
        torch.testing.assert_close(once[key], accumulated[key], rtol=1e-4, atol=5e-5)
    assert not torch.equal(once["conv_in.weight"], train_in_process(tmp_path / "c", text(clip), steps=1)["conv_in.weight"])


def test_sampling_refuses_a_condition_the_model_does_not_take(clip):
    from service.sample import check_condition_args

    unconditional = load_config(None, [])
    with pytest.raises(UserError, match="--prompt: this model is not text-conditional"):
        check_condition_args(unconditional, None, None, "a red circle")
    with pytest.raises(UserError, match="--guidance-scale: this model is unconditional"):
        check_condition_args(unconditional, None, 3.0, None)
    conditional = load_config(None, text(clip))
    with pytest.raises(UserError, match="--class: this model is not class-conditional"):
        check_condition_args(conditional, 1, None, None)
    with pytest.raises(UserError, match="at least 1"):
        check_condition_args(conditional, None, 0.5, "a red circle")
    check_condition_args(conditional, None, 2.0, "a red circle")


def test_a_pixel_space_text_model_samples_per_prompt(tmp_path, clip):
    from service.models.build import build_model
    from service.sample import generate

    cfg = load_config(None, text(clip))
    model = build_model(cfg.model, 0)
    red = generate(model, cfg, 2, seed=1, steps=2, prompt="a red circle", guidance_scale=2.0)
    blue = generate(model, cfg, 2, seed=1, steps=2, prompt="a blue square", guidance_scale=2.0)
    assert red.shape == (2, 3, 16, 16) and not torch.equal(red, blue)
    assert torch.equal(red, generate(model, cfg, 2, seed=1, steps=2, prompt="a red circle", guidance_scale=2.0))


def test_an_encoder_that_gives_no_hidden_states_is_refused_at_load(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from service.models.text import load_text_encoder

    clip = tiny_text_encoder(tmp_path / "clip")
    config = BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    for cls, name in ((BertForMaskedLM, "mlm"), (BertModel, "base")):
        folder = tmp_path / name
        cls(config).save_pretrained(str(folder / "text_encoder"))
        (folder / "tokenizer").mkdir()
        for f in (clip / "tokenizer").iterdir():
            (folder / "tokenizer" / f.name).write_bytes(f.read_bytes())
    # A masked-LM checkpoint loads as its base model: the hidden states, not the vocabulary logits.
    assert load_text_encoder(str(tmp_path / "mlm"))(["a red circle"]).shape == (1, 16, 32)
    # A folder that does not exist, or a URL, is named as such.
    with pytest.raises(UserError, match="no such folder"):
        load_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="a URL"):
        load_text_encoder("s3://bucket/clip")


def test_captions_in_utf16_or_with_a_bom_read_as_the_text_and_empty_ones_do_not_count(tmp_path, clip):
    from PIL import Image

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes("a red square".encode("utf-16"))
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfa red square")
    (tmp_path / "c.txt").write_bytes(b"")
    source = build_source(load_config(None, ['data.kind="folder"', f'data.url="{tmp_path}"', 'data.resize="resize"', *text(clip)]))
    assert [source.caption(i) for i in range(4)] == ["a red square", "a red square", "", ""]
    assert source.num_captioned == 2


def test_sampling_refuses_a_text_encoder_that_changed_since_training(tmp_path):
    from service.checkpoint.refs import resolve
    from service.cli.common import check_frozen_parts
    from service.models import text as text_module

    clip = tiny_text_encoder(tmp_path / "clip")
    train_in_process(tmp_path / "run", text(str(clip)), steps=1)
    check_frozen_parts(resolve(str(tmp_path / "run")))  # unchanged: fine
    weights = clip / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    text_module.text_encoder_digest.cache_clear()
    with pytest.raises(UserError, match="holds other files than the run trained with"):
        check_frozen_parts(resolve(str(tmp_path / "run")))


def test_the_same_text_encoder_in_another_folder_is_the_same_run(tmp_path):
    import shutil

    from service.checkpoint.identity import differences, fingerprint

    clip = tiny_text_encoder(tmp_path / "clip")
    saved = fingerprint(load_config(None, text(str(clip))))
    shutil.copytree(clip, tmp_path / "elsewhere")
    hard, soft = differences(saved, fingerprint(load_config(None, text(str(tmp_path / "elsewhere")))))
    assert hard == [] and [line.split(":")[0] for line in soft] == ["model.text_encoder"]
