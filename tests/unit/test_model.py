import pytest
import torch

from service.config import load_config
from service.models.build import build_model, check_geometry, forward, null_label, sample_size
from service.models.ema import EMAState, build_ema
from service.models.registry import FAMILIES
from service.train.state import LRSchedulerState, TrainState, warmup_cosine


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_unet_shapes_per_preset(preset):
    cfg = load_config(None, [f"model.preset=\"{preset}\""])
    model = build_model(cfg.model, seed=0)
    size = sample_size(cfg.model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([10])).sample
    assert out.shape == x.shape


def test_init_depends_only_on_seed():
    cfg = load_config(None)
    a, b = build_model(cfg.model, 0), build_model(cfg.model, 0)
    torch.manual_seed(123)  # global RNG must not matter
    c = build_model(cfg.model, 0)
    for (k, v), w, u in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(v, w) and torch.equal(v, u), k
    d = build_model(cfg.model, 1)
    assert not all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), d.state_dict().values()))


def test_bad_sample_size_is_rejected():
    cfg = load_config(None, ["model.preset=\"base\"", "model.sample_size=36"])
    with pytest.raises(ValueError, match="divisible by 8"):
        check_geometry(cfg.model)


def test_ema_state_round_trip():
    cfg = load_config(None)
    model = build_model(cfg.model, 0)
    ema = build_ema(model, cfg.train)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())
    state = EMAState(ema, model).state_dict()
    other_model = build_model(cfg.model, 5)
    other = build_ema(other_model, cfg.train)
    EMAState(other, other_model).load_state_dict(state)
    assert other.optimization_step == 1
    for a, b in zip(ema.shadow_params, other.shadow_params):
        assert torch.equal(a, b)


def test_warmup_cosine_shape():
    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_lr_scheduler_state_restores_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10, 110, 0.1))
    for _ in range(37):
        opt.step()
        sched.step()
    state = LRSchedulerState(sched).state_dict()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, warmup_cosine(10, 110, 0.1))
    LRSchedulerState(sched2).load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_train_state_round_trip():
    s = TrainState(step=5, samples_seen=80, epoch=1)
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t == s


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> str:
    from tests.helpers import tiny_text_encoder

    return str(tiny_text_encoder(tmp_path_factory.mktemp("clip")))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_in_the_registry_builds_each_of_its_presets(name, text_encoder):
    family = FAMILIES[name]
    module = family.implementation()
    assert tuple(module.PRESETS) == family.presets  # the registry repeats them for config validation
    wanted = ("model_kwargs", "check_geometry", "build", "forward") + (
        ("null_label",) if "class" in family.conditionings else ())
    for attr in wanted:
        assert callable(getattr(module, attr)), f"{family.module} lacks {attr}"
    for conditioning in family.conditionings:
        extra = {"class": ["model.num_classes=3"], "text": [f'model.text_encoder="{text_encoder}"']}.get(
            conditioning, [])
        for preset in family.presets:  # every preset's arguments fit its class (meta device: free)
            cfg = load_config(None, [f'model.family="{name}"', f'model.preset="{preset}"',
                                     f'model.conditioning="{conditioning}"', *extra])
            check_geometry(cfg.model)
        cfg = load_config(None, [f'model.family="{name}"', f'model.preset="{family.presets[0]}"',
                                 f'model.conditioning="{conditioning}"', *extra])
        model = build_model(cfg.model, 0)
        side = sample_size(cfg.model)
        cond = {"class": torch.tensor([null_label(cfg.model)]) if conditioning == "class" else None,
                "text": torch.zeros(1, 16, 32)}.get(conditioning)  # the tiny encoder's 16 tokens x 32
        out = forward(cfg.model, model, torch.zeros(1, 3, side, side), torch.tensor([1]), cond)
        assert out.shape == (1, 3, side, side)


@pytest.mark.parametrize("family, arch, needle", [
    ("unet", 'model.arch.no_such_keyword=3', "model.arch.no_such_keyword is not an argument"),
    ("unet", 'model.arch.block_out_channels=[32, 64, 64]', "does not fit"),  # 2 block types, 3 widths
    ("dit", 'model.arch.patch_size=3', "divisible by the patch size 3"),
])
def test_a_wrong_architecture_is_named_before_anything_is_built(family, arch, needle):
    cfg = load_config(None, [f'model.family="{family}"', 'model.conditioning="class"', "model.num_classes=3", arch])
    with pytest.raises(ValueError, match=needle):
        check_geometry(cfg.model)


def test_arch_keywords_reach_the_model_and_override_the_preset():
    cfg = load_config(None, ["model.arch.layers_per_block=2", 'model.arch.norm_num_groups=16'])
    model = build_model(cfg.model, 0)
    assert model.config.layers_per_block == 2 and model.config.norm_num_groups == 16
    assert build_model(load_config(None, []).model, 0).config.layers_per_block == 1  # the preset's
