"""The wire shape of each endpoint, as pure functions: status and body in, values out.

This module names where results come from: the origin they are stored under.
"""

from __future__ import annotations

import os

SIMULATED_ORIGIN = "simulator"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def endpoint_origin(base_url: str | None, simulated: bool) -> str:
    """The name results are stored under: the endpoint's base URL, or `simulator`."""
    if simulated:
        return SIMULATED_ORIGIN
    return (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
