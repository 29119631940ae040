"""One typed configuration for the whole job: TOML file + ``--set a.b=c`` overrides.

The config is validated (pydantic, unknown keys forbidden) before any process group, file or
bucket is touched, so a typo costs a clear error instead of a half-started cluster job.
``schema`` holds the sections and keys, ``loading`` reads and validates, ``hashing`` makes the
digest every manifest records. The names below are the package's public API.
"""

from service.config.loading import CONFIGS_DIR, config_from_dict, load_config, resolve_config_path
from service.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DivergenceConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    RunConfig,
    SupervisorConfig,
    TrainConfig,
)
from service.redact import REDACTED, SECRET_KEYS, redact_config_dict, redact_text, redact_url

__all__ = [
    "CONFIGS_DIR", "REDACTED", "SECRET_KEYS", "CheckpointConfig", "Config", "DataConfig", "DivergenceConfig", "LoggingConfig",
    "MetricsConfig", "ModelConfig", "RunConfig", "SupervisorConfig", "TrainConfig", "config_from_dict",
    "load_config", "redact_config_dict", "redact_text", "redact_url", "resolve_config_path",
]
