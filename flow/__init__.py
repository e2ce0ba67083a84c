"""flow: send prompts through an OpenAI-compatible API, rate-limited, checkpointed, resumable."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "FlowError",
    "PipelineConfig",
    "RunOptions",
    "RunSummary",
    "__version__",
    "load_config",
    "run_pipeline",
]

_EXPORTS = {"ConfigError": "flow.errors", "FlowError": "flow.errors",
            "PipelineConfig": "flow.config", "load_config": "flow.config",
            "RunOptions": "flow.run", "RunSummary": "flow.progress", "run_pipeline": "flow.run"}


def __getattr__(name: str) -> Any:
    # lazy, so `flow status` and `flow export` don't pay for importing the openai SDK
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flow' has no attribute {name!r}")
