"""The pipeline file: its typed models (`models`) and how it is read (`reading`)."""

from flow.config.models import (
    BUILTIN_POST_STEPS,
    KEYED_POST_STEPS,
    RESERVED_PARAMS,
    BatchConfig,
    CallConfig,
    LoadConfig,
    MessageConfig,
    PipelineConfig,
    PriceConfig,
    RetryConfig,
    StageConfig,
)
from flow.config.reading import check_api_key, load_config, parse_config
from flow.config.store_url import StoreURL, is_postgres

__all__ = ["BUILTIN_POST_STEPS", "KEYED_POST_STEPS", "RESERVED_PARAMS", "BatchConfig",
           "CallConfig", "LoadConfig", "MessageConfig", "PipelineConfig", "PriceConfig",
           "RetryConfig", "StageConfig", "StoreURL", "check_api_key", "is_postgres", "load_config", "parse_config"]
