"""Reading a config: a TOML file or a bundled preset, ``--set section.key=value`` overrides,
validation with errors that name each bad key."""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.config.schema import Config
from service.errors import UserError
from service.launch_env import is_config_key
from service.redact import REDACTED

# Presets shipped in the repository (configs/*.toml). With no --config at all, the defaults
# are the embedded default job: tiny preset, the shapes data set, local storage under ./runs.
# service/configs links to the repository's configs/; wheels (and so the images) carry the files.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


UNSET = object()  # `--set key=null`: back to the default

# Paths a config file may give relative to its own folder, as a file that travels with its data
# means them (the working directory is wherever the command happens to run).
FILE_RELATIVE_PATHS = (("data", "url"), ("data", "cache_dir"), ("checkpoint", "url"),
                       ("checkpoint", "memory_tier_dir"), ("logging", "tensorboard_dir"))
# Local folder or hub id ("org/name" reads as either): relative to the file where such a folder
# exists there, else left for diffusers/transformers to look up.
FILE_RELATIVE_IF_THERE = (("model", "vae"), ("model", "text_encoder"), ("model", "init_from"))


def resolve_file_relative(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of a config file's ``data`` absolute against ``folder``, and
    ``~`` the user's home, in place (``--set`` values and the defaults stay relative to the
    working directory). ``checkpoint.resume`` too where it names a checkpoint (not auto/never)."""
    keys = [(key, False) for key in FILE_RELATIVE_PATHS] + [(key, True) for key in FILE_RELATIVE_IF_THERE]
    resume = data.get("checkpoint", {}).get("resume") if isinstance(data.get("checkpoint"), dict) else None
    if resume not in (None, "auto", "never"):
        keys.append((("checkpoint", "resume"), False))
    for (section, key), only_if_there in keys:
        table = data.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str) or not value:
            continue
        scheme = "file://" if value.startswith("file://") else ""  # file://out: a relative path too
        if "://" in value[len(scheme):]:  # s3://, memory://, ...
            continue
        path = Path(value[len(scheme):]).expanduser()
        if not path.is_absolute():
            if only_if_there and not (folder / path).exists():
                continue  # a hub id ("org/name"), not a folder here
            path = folder / path
        table[key] = scheme + os.path.normpath(path)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=30")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not is_config_key(parts):
        # Name the key only: the value may be a secret (supervisor.token).
        raise UserError(f"--set {key.strip()!r}=...: the key must be section.key, e.g. train.max_steps "
                        "(or model.arch.<keyword>)")
    if raw.strip() == "null":  # TOML has no null: an unquoted null puts the key back to its default
        return parts, UNSET
    try:  # a TOML literal (30, 1e-4, true, "text"); anything else is a plain string
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            allowed = _allowed_keys(str(section)) if section else sorted(Config.model_fields)
            lines.append(f"  {key}: unknown key; allowed: {', '.join(allowed)}")
        else:
            lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def _allowed_keys(section: str) -> list[str]:
    field = Config.model_fields.get(section)
    if field is None or field.annotation is None:
        return sorted(Config.model_fields)
    model = field.annotation
    return sorted((f.alias or name) for name, f in model.model_fields.items())


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a preset in configs/ (tiny, small, base)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = CONFIGS_DIR / f"{path}.toml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(f.stem for f in CONFIGS_DIR.glob("*.toml")))
    raise UserError(f"config file {str(path)!r} not found (bundled presets: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or bundled preset), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        cfg_path = resolve_config_path(path)
        source = str(cfg_path)
        try:
            data = tomllib.loads(cfg_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {cfg_path}: not valid TOML: {e}") from None
        if Path(path).is_file():  # a file of the user's (not a bundled preset named by its name)
            resolve_file_relative(data, cfg_path.absolute().parent)
    for item in overrides or []:
        parts, value = _parse_override(item)
        table = data
        for depth, name in enumerate(parts[:-1]):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                what = "a section" if depth == 0 else "a table"
                raise UserError(f"--set {'.'.join(parts)}=...: {'.'.join(parts[:depth + 1])!r} is not {what}")
        if value is UNSET:
            if parts[0] not in Config.model_fields or (len(parts) == 2 and parts[1] not in _allowed_keys(parts[0])):
                raise UserError(f"--set {'.'.join(parts)}=null: unknown key (allowed in [{parts[0]}]: "
                                f"{', '.join(_allowed_keys(parts[0]))})")
            table.pop(parts[-1], None)
        else:
            table[parts[-1]] = value
    cfg = config_from_dict(data, source=source)
    _check_usable(cfg, source)
    return cfg


def _check_usable(cfg: Config, source: str) -> None:
    """What a job's own config (not a recorded one) must also satisfy: no placeholder where a
    secret goes (a saved --print-config output would otherwise run with "***" as its token),
    and sample grids the noise schedule can render."""
    placeholders = [f"{section}.{key}" for section, values in cfg.to_dict().items() for key, value in values.items()
                    if isinstance(value, str) and (value == REDACTED or f"://{REDACTED}@" in value)]
    if placeholders:
        raise UserError(f"invalid configuration ({source}): {', '.join(placeholders)} holds the redaction "
                        f"placeholder {REDACTED!r} (from --print-config or a manifest); put the real value "
                        "there, or leave it out (the token can come from FTDIFF_TOKEN)")
    for tracker, module, extra in (("mlflow", "mlflow", "mlflow"), ("wandb", "wandb", "wandb")):
        if tracker in cfg.logging.trackers and importlib.util.find_spec(module) is None:
            raise UserError(f"invalid configuration ({source}): logging.trackers names {tracker}, whose client is "
                            f"not installed here: pip install 'ftdiff[{extra}]' (or leave {tracker} out)")
    if cfg.logging.sample_every and cfg.logging.sample_steps > cfg.model.num_train_timesteps:
        raise UserError(f"invalid configuration ({source}): logging.sample_steps = {cfg.logging.sample_steps} "
                        f"is more than model.num_train_timesteps = {cfg.model.num_train_timesteps}")


def config_from_dict(data: dict[str, Any], source: str = "dict") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_errors(e, source)) from None
