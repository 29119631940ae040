"""export and sample from a real run's checkpoint: the weights exported bitwise, a diffusers
pipeline that samples, a PNG grid; secrets never leave in exported files, a corrupt shard is exit 1
naming the file, and step-12 names step-000000012."""

import json
import shutil

import pytest
import torch

from service.checkpoint.manifest import MANIFEST, step_dir
from service.errors import EXIT_FAILURE, EXIT_OK
from tests.helpers import BASELINE_STEPS, weights
from tests.helpers import ftdiff_inprocess as ftdiff

SECRET = "k3y-Secret/Value"
TOKEN = "tok-export-abcdef"


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


def _copy(baseline_url: str, tmp_path) -> str:  # type: ignore[no-untyped-def]
    dst = tmp_path / "run"
    shutil.copytree(baseline_url, dst)
    return str(dst)


@pytest.mark.timeout(180)
def test_export_of_an_old_manifest_holding_secrets_redacts_them(baseline, tmp_path):
    from safetensors import safe_open

    url = _copy(baseline[0], tmp_path)
    # A checkpoint written before manifests were redacted: the secrets are in its manifest.
    path = tmp_path / "run" / step_dir(BASELINE_STEPS) / MANIFEST
    body = json.loads(path.read_text())
    body["config"]["supervisor"]["token"] = TOKEN
    body["config"]["data"]["url"] = f"s3://AKIAOLD:{SECRET}@images/set"
    body["config"]["checkpoint"]["endpoint_url"] = f"https://minio:{SECRET}@minio:9000"
    path.write_text(json.dumps(body))
    out = tmp_path / "unet.safetensors"
    res = ftdiff("export", f"{url}/step-{BASELINE_STEPS}", "--format", "safetensors", "--out", str(out))
    assert res.returncode == EXIT_OK, res.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    text = json.dumps(meta)
    assert SECRET not in text and TOKEN not in text and "AKIAOLD" not in text
    config = json.loads(meta["config"])
    assert config["supervisor"]["token"] == "***" and config["data"]["url"] == "s3://***@images/set"
    assert meta["source"].endswith(step_dir(BASELINE_STEPS))
    shown = ftdiff("ckpt", "show", url)
    assert shown.returncode == EXIT_OK and SECRET not in shown.stdout + shown.stderr


@pytest.mark.timeout(180)
def test_corrupt_shard_is_exit_1_naming_the_file(baseline, tmp_path):
    url = _copy(baseline[0], tmp_path)
    folder = tmp_path / "run" / step_dir(BASELINE_STEPS)
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    for argv in (["export", url, "--format", "safetensors", "--out", str(tmp_path / "u.safetensors")],
                 ["sample", f"{url}/step-{BASELINE_STEPS}", "--out", str(tmp_path / "g.png"), "--n", "1",
                  "--steps", "1"]):
        res = ftdiff(*argv)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == EXIT_FAILURE and len(lines) == 1, res.stderr
        assert shard.name in lines[0] and "crc32c" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "g.png").exists()
