"""The wire shape of each endpoint, as pure functions: status and body in, values out.

This module names where results come from: the origin they are stored under.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from flow.errors import ConfigError

SIMULATED_ORIGIN = "simulator"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def endpoint_origin(base_url: str | None, simulated: bool, where: str = "") -> str:
    """The name results are stored under: the endpoint's base URL, or `simulator`.
    `where` (the pipeline file) begins every error."""
    if simulated:
        return SIMULATED_ORIGIN
    url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    try:
        parts = urlsplit(url)
        credentials = "@" in parts.netloc
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        raise ConfigError(f"{where}call.base_url (or OPENAI_BASE_URL): not a URL: {e}") from None
    if credentials:
        # never stored, never printed: the URL is named without what precedes the host
        raise ConfigError(
            f"{where}call.base_url (or OPENAI_BASE_URL): credentials in the URL "
            f"({parts.scheme}://…@{parts.hostname}); put the API key in OPENAI_API_KEY or "
            "call.api_key, and a gateway's credentials in call.headers")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}call.base_url (or OPENAI_BASE_URL): expected http(s)://host/…, "
                          f"got {url!r}")
    return url
