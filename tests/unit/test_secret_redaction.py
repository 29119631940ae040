"""Secrets stay in the process: redaction of URLs and the token, the hash, logs, and the
worker overrides that travel in FTDIFF_OVERRIDES instead of the command line."""

from __future__ import annotations

import json
import logging

import pytest

from service.config import Config, load_config, redact_config_dict, redact_url
from service.errors import EXIT_USAGE, UserError
from service.launch_env import OVERRIDES_ENV, overrides_from_env, overrides_to_env

SECRET = "s3cr3t-Value/With+Slash"
TOKEN = "tok-0123456789abcdef"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("url,expected", [
    ("s3://AKIAKEY:secret@bucket/run", "s3://***@bucket/run"),
    (f"s3://AKIAKEY:{SECRET}@bucket/run", "s3://***@bucket/run"),  # "/" inside the secret
    ("https://user:p@ss@host:9000/x", "https://***@host:9000/x"),  # "@" inside the password
    ("http://user@host/x", "http://***@host/x"),
    ("simplecache::s3://k:s@bucket/x", "simplecache::s3://***@bucket/x"),
    ("https://host/x?X-Amz-Signature=abc&part=1", "https://host/x?X-Amz-Signature=***&part=1"),
    ("https://acct.blob/c?sv=1&sig=zzz", "https://acct.blob/c?sv=1&sig=***"),
    # "?", "#" or "/" inside the password: not a query, fragment or path
    ("http://minio:pa?ss@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
    ("http://minio:pa#ss@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
    ("http://minio:p/a?ss@127.0.0.1:9000/x", "http://***@127.0.0.1:9000/x"),
    # Nothing to hide: unchanged.
    ("s3://bucket/run", "s3://bucket/run"),
    ("http://127.0.0.1:9000/x", "http://127.0.0.1:9000/x"),
    ("http://[::1]:9000/x", "http://[::1]:9000/x"),
    ("s3://bucket/user@example.com/data", "s3://bucket/user@example.com/data"),
    ("runs/ftdiff/checkpoints", "runs/ftdiff/checkpoints"),
    ("memory://ckpt", "memory://ckpt"),
])
def test_redact_url_every_scheme(url, expected):
    assert redact_url(url) == expected
    assert redact_url(redact_url(url)) == expected  # idempotent: safe to apply twice


def _secret_config() -> Config:
    return load_config(None, [
        f'supervisor.token="{TOKEN}"',
        f'checkpoint.url="s3://AKIAKEY:{SECRET}@bucket/run"',
        f'checkpoint.endpoint_url="https://minio:{SECRET}@minio.local:9000"',
        f'checkpoint.resume="s3://AKIAKEY:{SECRET}@bucket/old/step-150"',
        f'supervisor.url="http://ops:{SECRET}@sup:29450"',
        'data.kind="folder"', f'data.url="s3://AKIAKEY:{SECRET}@images/set"',
    ])


@pytest.mark.timeout(10)
def test_redacted_dict_has_the_shape_of_to_dict_and_no_secret():
    cfg = _secret_config()
    plain, red = cfg.to_dict(), cfg.redacted_dict()
    assert {s: set(v) for s, v in plain.items()} == {s: set(v) for s, v in red.items()}
    text = json.dumps(red)
    assert SECRET not in text and TOKEN not in text and "AKIAKEY" not in text
    assert red["supervisor"]["token"] == "***"
    assert red["checkpoint"]["url"] == "s3://***@bucket/run"
    assert red["checkpoint"]["endpoint_url"] == "https://***@minio.local:9000"
    assert red["data"]["url"] == "s3://***@images/set"
    assert red["supervisor"]["url"] == "http://***@sup:29450"
    # Everything else is untouched, and "no token" stays visible as None.
    assert red["train"] == plain["train"]
    assert Config().redacted_dict()["supervisor"]["token"] is None
    assert Config().redacted_dict() == Config().to_dict()
    # An old manifest's config (any shape) can be redacted without validating it.
    old = {**plain, "gone_section": {"x": 1}}
    assert SECRET not in json.dumps(redact_config_dict(old))


@pytest.mark.timeout(10)
def test_hash_keeps_its_meaning_and_carries_no_secret():
    # Unchanged for a config without secrets: the digest older releases recorded (more of
    # those in test_config.py).
    cfg = load_config(None, ["run.seed=5"])
    assert cfg.hash() == "b308fe91bf53e36f"
    # Still a digest of the settings ...
    assert cfg.hash() != load_config(None, ["run.seed=6"]).hash()
    assert cfg.hash() != load_config(None, ["run.seed=5", 'data.on_bad_image="skip"']).hash()
    # ... where a secret only counts as set or unset, so the digest cannot be brute-forced.
    a = load_config(None, ['supervisor.token="aaaa-1"']).hash()
    assert a == load_config(None, ['supervisor.token="bbbb-2"']).hash() != Config().hash()


@pytest.mark.timeout(10)
def test_manifest_never_records_a_secret_even_if_handed_one():
    from service.checkpoint.manifest import FileEntry, Manifest

    m = Manifest(1, 1, "h", {".metadata": FileEntry(1, "00000000")}, config=_secret_config().to_dict())
    text = m.to_json().decode()
    assert SECRET not in text and TOKEN not in text
    assert Manifest.from_json(m.to_json()).config["supervisor"]["token"] == "***"


@pytest.mark.timeout(10)
def test_logs_mask_url_credentials_and_the_token(capsys):
    from service.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("text", "json"):
            setup_logging(0, fmt, secrets=[TOKEN, None])
            log = logging.getLogger("test_secret_redaction")
            log.info("root %s token %s", f"s3://AKIAKEY:{SECRET}@bucket/run", TOKEN)
            try:
                raise OSError(f"could not reach https://u:{SECRET}@host/x")
            except OSError:
                log.exception("failed")
        err = capsys.readouterr().err
        assert "s3://***@bucket/run" in err and "token ***" in err and "https://***@host/x" in err
        assert SECRET not in err and TOKEN not in err and "AKIAKEY" not in err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# -- FTDIFF_OVERRIDES: the worker's overrides, off the world-readable command line ---------------
@pytest.mark.timeout(10)
def test_overrides_env_round_trip_and_order(monkeypatch):
    from service.train.entry import worker_config

    items = ["train.max_steps=7", f'supervisor.token="{TOKEN}"', 'run.name="from env"']
    monkeypatch.setenv(OVERRIDES_ENV, overrides_to_env(items))
    assert overrides_from_env() == items
    cfg = worker_config(None, ["train.max_steps=9"])  # --set comes after the environment
    assert cfg.train.max_steps == 9 and cfg.supervisor.token == TOKEN and cfg.run.name == "from env"
    monkeypatch.setenv(OVERRIDES_ENV, "")
    assert overrides_from_env() == []
    monkeypatch.delenv(OVERRIDES_ENV)
    assert worker_config(None, []).train.max_steps == Config().train.max_steps


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", [
    f'["supervisor.token={TOKEN}"',  # not JSON
    f'{{"supervisor.token": "{TOKEN}"}}',  # not a list
    '["train.max_steps=3", 4]',  # not a string
    f'["supervisor.token {TOKEN}"]',  # no "="
    f'["token={TOKEN}"]',  # no section
], ids=["not-json", "not-a-list", "not-a-string", "no-equals", "no-section"])
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_malformed_overrides_env_is_a_usage_error_naming_the_variable(monkeypatch, capsys, value):
    from service.train.entry import run_worker

    monkeypatch.setenv(OVERRIDES_ENV, value)
    with pytest.raises(UserError) as e:
        overrides_from_env()
    assert OVERRIDES_ENV in str(e.value) and TOKEN not in str(e.value)
    assert run_worker(None, []) == EXIT_USAGE  # before any process group is touched
    err = capsys.readouterr().err
    assert OVERRIDES_ENV in err and TOKEN not in err and "Traceback" not in err


@pytest.mark.timeout(10)
def test_set_errors_do_not_echo_values():
    with pytest.raises(UserError) as e:
        load_config(None, [f"supervisor..token={TOKEN}"])
    assert TOKEN not in str(e.value)


@pytest.mark.parametrize("item", ['supervisor.token="***"', 'checkpoint.url="s3://***@bucket/run"',
                                  'checkpoint.endpoint_url="http://***@minio:9000"'])
def test_a_saved_print_config_with_placeholders_is_refused(item):
    """`ftdiff train --print-config > job.toml` then `--config job.toml`: "***" is never taken
    for the secret itself."""
    from service.config import load_config

    with pytest.raises(UserError, match="redaction placeholder"):
        load_config(None, [item])


def test_recorded_configs_with_placeholders_still_load():
    """Manifests record redacted configs; export and sample rebuild the model from them."""
    from service.config import config_from_dict

    cfg = config_from_dict({"supervisor": {"token": "***"}, "checkpoint": {"url": "s3://***@b/r"}})
    assert cfg.supervisor.token == "***"
