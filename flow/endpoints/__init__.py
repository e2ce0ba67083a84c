"""The wire shape of each endpoint, as pure functions: status and body in, values out.

This module names where results come from: the origin they are stored under.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from flow.errors import ConfigError

SIMULATED_ORIGIN = "simulator"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def endpoint_url(base_url: str | None) -> str:
    """The base URL the SDK's client sends to, as it writes it (for the run's record)."""
    url = _given(base_url)
    return url if url.endswith("/") else url + "/"


def _given(base_url: str | None) -> str:
    """The base URL as the SDK takes it: `call.base_url`, else `OPENAI_BASE_URL`, else
    OpenAI's."""
    return base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


def endpoint_origin(base_url: str | None, simulated: bool, where: str = "",
                    endpoint_id: str | None = None) -> str:
    """The name results are stored under: `call.endpoint_id` when set (a server that moves
    keeps its results), `simulator`, or the endpoint's base URL in a normal form, so that
    one server written two ways (`localhost` or `127.0.0.1`, a trailing slash, `:443`) is
    one origin. `where` (the pipeline file) begins every error."""
    if simulated:
        return SIMULATED_ORIGIN  # never a real endpoint's name: a simulated reply is no answer
    if endpoint_id:
        return endpoint_id
    url = _given(base_url).rstrip("/")
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
    return _normal(parts.scheme, parts.hostname, parts.port, parts.path)


def _normal(scheme: str, host: str, port: int | None, path: str) -> str:
    scheme = scheme.lower()
    host = "localhost" if host.lower() in LOOPBACK or host.startswith("127.") else host.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    path = "/" + "/".join(part for part in path.split("/") if part)
    return f"{scheme}://{netloc}{path.rstrip('/')}"


def same_origin(origin: str, known: list[str]) -> str:
    """The origin a store already holds for the same endpoint written another way (a store
    from before origins were normal), else `origin` itself."""
    for other in known:
        if other == origin:
            return other
        try:
            parts = urlsplit(other.rstrip("/"))
            if parts.hostname and _normal(parts.scheme, parts.hostname, parts.port,
                                          parts.path) == origin:
                return other
        except ValueError:
            continue
    return origin
