"""How the worker builds its denoiser: model.init_from (safely, same architecture only),
activation checkpointing and torch.compile (the same math, the same checkpoint keys)."""

from __future__ import annotations

import json

import pytest
import torch

from service.config import load_config
from service.errors import UserError
from service.models.ema import EMAState
from tests.helpers import TINY, train_in_process

pytestmark = pytest.mark.timeout(300)


def _trainer(tmp_path, extra):  # type: ignore[no-untyped-def]
    from service.dist import DistInfo
    from service.train.loop import Trainer

    cfg = load_config(None, TINY + [f'checkpoint.url="{tmp_path}"', "checkpoint.every_steps=100",
                                    "checkpoint.memory_tier=false", *extra])
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))


def test_activation_checkpointing_recomputes_the_same_math(tmp_path):
    plain = train_in_process(tmp_path / "a", [], steps=2)
    recomputed = train_in_process(tmp_path / "b", ["train.activation_checkpointing=true"], steps=2)
    for key in plain:
        torch.testing.assert_close(plain[key], recomputed[key], rtol=0, atol=1e-6)


def test_compile_keeps_the_checkpoint_keys_and_the_math(tmp_path, monkeypatch):
    """torch.compile with dynamo's eager backend: the graph capture and the in-place compile
    (no "_orig_mod." in any checkpoint key) without inductor's CPU code generation, which takes
    minutes here (the GPU check runs the real thing)."""
    plain = train_in_process(tmp_path / "a", [], steps=2)
    real_compile = torch.nn.Module.compile
    compiled_modules = []

    def eager_compile(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        compiled_modules.append(type(self).__name__)
        return real_compile(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    compiled = train_in_process(tmp_path / "b", ["train.compile=true"], steps=2)
    assert compiled_modules == ["UNet2DModel"]
    assert set(compiled) == set(plain)
    for key in plain:
        torch.testing.assert_close(plain[key], compiled[key], rtol=0, atol=1e-6)


@pytest.fixture
def exported(tmp_path):  # type: ignore[no-untyped-def]
    """A diffusers pipeline folder exported from a 2-step run, and that run's weights."""
    from service.checkpoint.refs import resolve
    from service.export import export

    run = tmp_path / "run"
    train_in_process(run, [], steps=2)
    out = tmp_path / "pipeline"
    export(resolve(str(run)), "diffusers", str(out), "model")
    from safetensors.torch import load_file

    return out, load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_init_from_an_export_starts_from_its_weights(tmp_path, exported):
    folder, saved = exported
    for where in (folder, folder / "unet"):  # a pipeline folder, or the model folder in it
        trainer = _trainer(tmp_path / f"new-{where.name}", [f'model.init_from="{where}"', "train.max_steps=1"])
        try:
            for key, value in trainer.model.state_dict().items():
                assert torch.equal(value, saved[key]), key
            shadow = EMAState(trainer.ema, trainer.model).state_dict()["shadow"]  # the EMA starts there too
            assert shadow and all(torch.equal(value, saved[key]) for key, value in shadow.items())
        finally:
            trainer.close()


def test_init_from_refuses_another_architecture_a_pickle_or_another_class(tmp_path, exported):
    folder, _ = exported
    with pytest.raises(UserError, match="does not fit this run's architecture"):
        _trainer(tmp_path / "a", [f'model.init_from="{folder}"', "model.arch.layers_per_block=2"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "unet" / "config.json").read_text())
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="only safetensors are read"):
        _trainer(tmp_path / "b", [f'model.init_from="{pickled}"'])
    other = json.loads((folder / "unet" / "config.json").read_text()) | {"_class_name": "DiTTransformer2DModel"}
    (pickled / "config.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="holds a 'DiTTransformer2DModel'"):
        _trainer(tmp_path / "c", [f'model.init_from="{pickled}"'])
    with pytest.raises(UserError, match="not a diffusers model or pipeline folder"):
        _trainer(tmp_path / "d", [f'model.init_from="{tmp_path}"'])
