"""export and sample from a real run's checkpoint."""

import pytest
import torch

from tests.helpers import ftdiff_inprocess as ftdiff
from tests.helpers import weights


@pytest.mark.timeout(120)
def test_safetensors_export_matches_checkpoint(baseline, tmp_path):
    from safetensors.torch import load_file

    url, _ = baseline
    for which in ("ema", "model"):
        out = tmp_path / f"{which}.safetensors"
        res = ftdiff("export", url, "--format", "safetensors", "--out", str(out), "--weights", which)
        assert res.returncode == 0, res.stderr
        exported = load_file(str(out))
        expected = weights(url, which)
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected)


@pytest.mark.timeout(180)
def test_diffusers_export_loads_with_ddpm_pipeline_and_samples(baseline, tmp_path):
    from diffusers import DDPMPipeline

    url, _ = baseline
    out = tmp_path / "pipeline"
    res = ftdiff("export", f"{url}/step-000000012", "--format", "diffusers", "--out", str(out))
    assert res.returncode == 0, res.stderr
    pipe = DDPMPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3)
    ema = weights(url, "ema")
    assert all(torch.equal(pipe.unet.state_dict()[k], ema[k]) for k in ema)
    assert ftdiff("export", url, "--format", "diffusers", "--out", str(out)).returncode == 2  # not empty


@pytest.mark.timeout(180)
def test_sample_writes_png_grid(baseline, tmp_path):
    from PIL import Image

    url, _ = baseline
    out = tmp_path / "grid.png"
    res = ftdiff("sample", url, "--out", str(out), "--n", "4", "--steps", "5")
    assert res.returncode == 0, res.stderr
    img = Image.open(out)
    assert img.size[0] > 16 * 2 and img.mode == "RGB"
    missing = ftdiff("sample", str(tmp_path / "nothing"), "--out", str(out))
    assert missing.returncode == 1 and "no such checkpoint root" in missing.stderr
