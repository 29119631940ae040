import pytest

from service.config import Config, load_config
from service.errors import UserError


def test_embedded_default_is_the_tiny_shapes_local_job():
    cfg = load_config(None)
    assert cfg.model.preset == "tiny"
    assert cfg.data.kind == "shapes"  # the easy synthetic set; "synthetic" is still accepted
    assert "://" not in cfg.checkpoint.url
    assert cfg.checkpoint.async_ is True and cfg.checkpoint.resume == "auto"


def test_presets_load_and_contract_keys_exist():
    for name in ("tiny", "small", "base"):
        cfg = load_config(name)
        assert cfg.model.preset == name
    d = Config().to_dict()
    for section, key in [("run", "name"), ("run", "seed"), ("model", "preset"), ("model", "sample_size"),
                         ("data", "kind"), ("data", "url"), ("train", "max_steps"),
                         ("train", "global_batch_size"), ("train", "lr"), ("checkpoint", "url"),
                         ("checkpoint", "every_steps"), ("checkpoint", "keep_last"), ("checkpoint", "async"),
                         ("checkpoint", "resume"), ("supervisor", "hang_timeout_s"),
                         ("supervisor", "max_restarts"), ("supervisor", "min_nodes"),
                         ("metrics", "host"), ("metrics", "port")]:
        assert key in d[section], f"{section}.{key}"


def test_set_overrides_typed_values():
    cfg = load_config(None, ["train.max_steps=30", "train.lr=1e-3", "checkpoint.async=false",
                             "checkpoint.url=s3://b/p", "run.name=\"x y\""])
    assert cfg.train.max_steps == 30 and cfg.train.lr == 1e-3
    assert cfg.checkpoint.async_ is False and cfg.checkpoint.url == "s3://b/p"
    assert cfg.run.name == "x y"


def test_unknown_key_names_key_and_allowed_values():
    with pytest.raises(UserError) as e:
        load_config(None, ["train.max_step=3"])
    msg = str(e.value)
    assert "train.max_step" in msg and "unknown key" in msg and "max_steps" in msg


def test_unknown_section():
    with pytest.raises(UserError, match="trian"):
        load_config(None, ["trian.max_steps=3"])


def test_wrong_type_names_key():
    with pytest.raises(UserError, match=r"train\.max_steps"):
        load_config(None, ["train.max_steps=\"many\""])
    with pytest.raises(UserError, match=r"checkpoint\.async"):
        load_config(None, ["checkpoint.async=\"yes\""])


def test_literal_lists_allowed_values():
    with pytest.raises(UserError) as e:
        load_config(None, ["model.preset=\"huge\""])
    assert "tiny" in str(e.value) and "base" in str(e.value)


def test_keep_last_below_two_refused():
    with pytest.raises(UserError, match="keep_last"):
        load_config(None, ["checkpoint.keep_last=1"])


def test_folder_needs_url():
    with pytest.raises(UserError, match="data.url"):
        load_config(None, ["data.kind=\"folder\""])


def test_bad_set_syntax_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_config_hash_changes_with_settings():
    assert load_config(None).hash() == load_config(None).hash()
    assert load_config(None).hash() != load_config(None, ["run.seed=1"]).hash()
