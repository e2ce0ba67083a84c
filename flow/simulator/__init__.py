"""An OpenAI-compatible server for trying pipelines and testing flow without a key.

`server` answers requests, `serving` serves it, `limits` shapes its rate limits, `config` says how it behaves and
`options` turns that into command-line options. `completions` makes the answer to one chat completion request;
`files` and `batches` (with `batch_lines`) serve the Batch API on the simulated `clock`. `replies` makes each reply in the shape the request asks for and
within its token cap, from what `prompts` reads in the prompt, from `schemas` for a JSON schema, and from the
deterministic `values`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SimulatorConfig", "SimulatorStats", "SimulatorThread", "format_duration", "serve"]
_EXPORTS = {"SimulatorConfig": "flow.simulator.config", "SimulatorStats": "flow.simulator.config",
            "SimulatorThread": "flow.simulator.serving", "serve": "flow.simulator.serving",
            "format_duration": "flow.simulator.limits"}


def __getattr__(name: str) -> Any:
    # lazy, so `flow status` builds its parser without importing aiohttp and the tokenizer
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flow.simulator' has no attribute {name!r}")
