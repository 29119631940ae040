"""export/sample on a real run's checkpoint: secrets never leave in exported files, a corrupt
shard is exit 1 naming the file, and step-12 names step-000000012."""

from __future__ import annotations

import json
import shutil

import pytest

from service.checkpoint.manifest import MANIFEST, step_dir
from service.errors import EXIT_FAILURE, EXIT_OK
from tests.helpers import BASELINE_STEPS
from tests.helpers import ftdiff_inprocess as ftdiff

SECRET = "k3y-Secret/Value"
TOKEN = "tok-issue12-abcdef"


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
