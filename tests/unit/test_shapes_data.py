"""The default data set (data.kind = "shapes"): flat, large, few-coloured shapes, each image a
pure function of (seed, index); the original "synthetic" images are unchanged."""

import pytest
import torch

from service.config import load_config
from service.data.generated import ShapesSource, SyntheticSource
from service.data.stream import TrainingSamples, build_source


@pytest.mark.timeout(30)
def test_default_kind_is_shapes_and_honours_epoch_size():
    cfg = load_config(None, ["data.epoch_size=64"])
    assert cfg.data.kind == "shapes"
    source = build_source(cfg)
    assert isinstance(source, ShapesSource) and len(source) == 64
    assert type(build_source(load_config(None, ['data.kind="synthetic"']))) is SyntheticSource


@pytest.mark.timeout(30)
def test_each_image_is_one_palette_colour_on_the_flat_background():
    src = ShapesSource(16, 300, seed=0)
    background = torch.full((3,), 0.2 * 2 - 1)
    palette = ShapesSource.PALETTE * 2 - 1
    colours, areas = set(), []
    for i in range(300):
        img = src.image(i)
        assert img.shape == (3, 16, 16) and img.min() >= -1 and img.max() <= 1
        pixels = img.flatten(1).T
        is_bg = (pixels == background).all(1)
        shape = pixels[~is_bg].unique(dim=0)
        assert len(shape) == 1, f"image {i}: {len(shape)} shape colours"
        match = (palette == shape[0]).all(1).nonzero()
        assert len(match) == 1
        colours.add(int(match[0]))
        areas.append(int((~is_bg).sum()))
        assert is_bg[:16].any() or is_bg[-16:].any()  # never fills the frame
    assert colours == set(range(len(palette)))
    assert min(areas) >= 20 and max(areas) <= 180  # large: about 8% to 70% of the image


@pytest.mark.timeout(30)
def test_images_and_noise_are_pure_functions_of_seed_and_index():
    a, b = ShapesSource(16, 50, seed=3), ShapesSource(16, 50, seed=3)
    assert all(torch.equal(a.image(i), b.image(i)) for i in range(50))
    assert not torch.equal(a.image(0), ShapesSource(16, 50, seed=4).image(0))
    s1, s2 = TrainingSamples(a, 3, 1000, True), TrainingSamples(b, 3, 1000, True)
    for p in (0, 7, 123):
        x, y = s1[p], s2[p]
        assert all(torch.equal(x[k], y[k]) for k in ("image", "noise", "timestep"))


@pytest.mark.timeout(30)
def test_synthetic_kind_draws_what_it_always_drew():
    # Runs recorded with data.kind = "synthetic" resume on the very same images (checksums of
    # the first ten images as the release before "shapes" drew them).
    s = SyntheticSource(16, 10, seed=0)
    imgs = torch.stack([s.image(i) for i in range(10)]).double()
    assert imgs.sum().item() == pytest.approx(-3492.4998994469643, abs=1e-6)
    assert (imgs * torch.arange(16).double()).sum().item() == pytest.approx(-25855.27379488945, abs=1e-6)
