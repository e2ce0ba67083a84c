"""flow: send prompts through an OpenAI-compatible API, rate-limited, checkpointed, resumable."""

from flow.config import PipelineConfig, load_config
from flow.errors import ConfigError, FlowError
from flow.run import RunOptions, RunSummary, run_pipeline

__version__ = "0.1.0"
__all__ = ["ConfigError", "FlowError", "PipelineConfig", "RunOptions", "RunSummary",
           "load_config", "run_pipeline", "__version__"]
