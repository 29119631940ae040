import re

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


# Hashes recorded by the release before the registries (b8568d2): a config keeps its hash
# across upgrades, whichever keys were added since.
RECORDED_HASHES = [
    ([], "410ac2e76f943f71"),
    (["run.seed=5"], "b308fe91bf53e36f"),
    (['data.kind="folder"', 'data.url="s3://b/imgs"'], "4e7da5be54edffcd"),
    (["checkpoint.memory_tier=false"], "9ff702ea2558d2fb"),
    (["supervisor.prestart_workers=false"], "4c5f7ff6d4e3b88b"),
    (["supervisor.prestart_workers=true"], "410ac2e76f943f71"),
    (["checkpoint.single_writer=true", "train.lr=0.001"], "a02d8afda3ef1ad7"),
    (['model.preset="small"', 'supervisor.token="abc"'], "6d075568f7b1e4a7"),
    (['model.family="unet"'], "410ac2e76f943f71"),  # added later, at its default
]


@pytest.mark.parametrize("overrides,recorded", RECORDED_HASHES)
def test_config_hashes_stay_what_older_releases_recorded(overrides, recorded):
    assert load_config(None, overrides).hash() == recorded


def test_an_added_key_changes_the_hash_only_off_its_default():
    assert load_config(None, ["data.on_bad_image=\"skip\""]).hash() != load_config(None, []).hash()


@pytest.mark.parametrize("overrides,needle", [
    (['data.kind="webdataset-typo"'], "data.kind = 'webdataset-typo' is not one of shapes, synthetic"),
    (['data.kind="folder"'], "data.kind = 'folder' needs data.url"),
    (['model.family="dit-typo"'], "model.family = 'dit-typo' is not one of unet"),
    (['model.preset="huge"'], "model.preset = 'huge' is not a preset of family 'unet' (tiny, small, base)"),
])
def test_kinds_and_families_are_checked_against_their_registries(overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        load_config(None, overrides)


@pytest.mark.timeout(10)
def test_set_null_puts_a_key_back_to_its_default(tmp_path):
    """TOML has no null: `--set model.vae=null` used to set the string "null"."""
    cfg_file = tmp_path / "job.toml"
    cfg_file.write_text('[model]\nsample_size = 32\n[checkpoint]\nurl = "/data/run"\n')
    cfg = load_config(str(cfg_file), ["model.sample_size=null", "checkpoint.url=null", "model.vae=null"])
    assert cfg.model.sample_size is None and cfg.model.vae is None
    assert cfg.checkpoint.url == load_config(None, []).checkpoint.url
    assert load_config(None, ['model.conditioning="none"']).model.conditioning == "none"


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "vae").mkdir(parents=True)
    (project / "job.toml").write_text(
        '[data]\nkind = "folder"\nurl = "images"\ncache_dir = "../cache"\n'
        '[checkpoint]\nurl = "out/checkpoints"\n[logging]\ntensorboard_dir = "tb"\n'
        '[model]\nvae = "vae"\ninit_from = "org/some-model"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the command runs from another folder
    cfg = load_config(project / "job.toml")
    assert cfg.data.url == str(project / "images")
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.checkpoint.url == str(project / "out" / "checkpoints")
    assert cfg.logging.tensorboard_dir == str(project / "tb")
    assert cfg.model.vae == str(project / "vae")  # a folder there
    assert cfg.model.init_from == "org/some-model"  # no such folder: a hub id, left as written


def test_a_relative_file_url_in_a_config_file_is_relative_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "job.toml").write_text('[checkpoint]\nurl = "file://out/checkpoints"\n'
                                       'resume = "file:///abs/checkpoints/step-4"\n')
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(tmp_path / "job.toml")
    assert cfg.checkpoint.url == f"file://{tmp_path}/out/checkpoints"
    assert cfg.checkpoint.resume == "file:///abs/checkpoints/step-4"  # absolute already: as given


@pytest.mark.parametrize("key", ["checkpoint.url", "checkpoint.resume", "data.url"])
@pytest.mark.parametrize("url", ["file:/tmp/x", "file:rel/x", "FILE:/x"])
def test_a_file_url_without_its_slashes_is_refused_naming_the_spellings_that_work(key, url):
    """fsspec reads file:/x as /x, but logs, status and identity took it for a folder "file:"."""
    with pytest.raises(UserError, match="file:///abs/path"):
        load_config(None, [f'{key}="{url}"'])


def test_absolute_paths_urls_and_set_values_are_left_as_given(tmp_path, monkeypatch):
    (tmp_path / "job.toml").write_text('[data]\nkind = "folder"\nurl = "/data/images"\n'
                                       '[checkpoint]\nurl = "s3://bucket/run"\n')
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(tmp_path / "job.toml", ['logging.tensorboard_dir="tb"'])
    assert (cfg.data.url, cfg.checkpoint.url) == ("/data/images", "s3://bucket/run")
    assert cfg.logging.tensorboard_dir == "tb"  # the command line's: the working directory's
    assert load_config(None).checkpoint.url == "runs/ftdiff/checkpoints"  # the embedded default's too


def test_a_data_folder_named_relative_before_and_absolute_now_is_the_same_data(tmp_path, monkeypatch):
    """Checkpoints from before file-relative paths recorded data.url as written."""
    from service.checkpoint.identity import differences

    monkeypatch.chdir(tmp_path)
    saved = {"data.url": "images", "data.length": 12}
    same = {"data.url": str(tmp_path / "images"), "data.length": 12}
    hard, soft = differences(saved, same)
    assert hard == [] and len(soft) == 1
    other = {"data.url": str(tmp_path / "other" / "images"), "data.length": 12}
    assert len(differences(saved, other)[0]) == 1  # another folder: other data, refused
    assert len(differences({"data.url": "s3://b/x"}, {"data.url": "s3://b/y"})[0]) == 1


def test_a_numeric_run_name_needs_no_quotes():
    assert load_config(None, ["run.name=5"]).run.name == "5"
    assert load_config(None, ["run.name=5"]).checkpoint.url == "runs/5/checkpoints"


def test_a_config_files_tilde_pinned_resume_and_symlinked_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real = tmp_path / "real"
    real.mkdir()
    (real / "job.toml").write_text('[checkpoint]\nurl = "~/ckpt"\nresume = "out/checkpoints/step-4"\n'
                                   '[data]\nkind = "folder"\nurl = "images"\n')
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "job.toml").symlink_to(real / "job.toml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "linked" / "job.toml")
    assert cfg.checkpoint.url == str(tmp_path / "home" / "ckpt")  # ~: the home, never a folder named "~"
    assert cfg.checkpoint.resume == str(tmp_path / "linked" / "out/checkpoints/step-4")  # beside the file
    assert cfg.data.url == str(tmp_path / "linked" / "images")  # as given, not where the link points
    (tmp_path / "never.toml").write_text('[checkpoint]\nresume = "never"\n')
    assert load_config(tmp_path / "never.toml").checkpoint.resume == "never"
