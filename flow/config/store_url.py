"""Where a store lives: a SQLite file (a `Path`, the default) or a PostgreSQL server (`StoreURL`).

A `StoreURL` prints without its password, wherever it is printed (`str`, `repr`, an f-string,
a message): only `conninfo` gives the URL itself, to connect with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

SCHEMES = ("postgresql", "postgres")
MASK = "***"


def is_store_url(text: str) -> bool:
    """Whether `text` names a PostgreSQL store (`postgresql://...` or `postgres://...`)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def redact(url: str) -> str:
    """`url` with its password (and any `password=` parameter) masked."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            name, colon, password = user.partition(":")
            netloc = f"{name}:{MASK}@{host}" if colon and password else netloc
        query = "&".join(f"{key}={MASK}" if key.lower() == "password" else f"{key}{eq}{value}"
                         for key, eq, value in (pair.partition("=") for pair in
                                                parts.query.split("&") if pair))
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return f"{url.partition('://')[0]}://{MASK}"


class StoreURL:
    """A PostgreSQL store's URL; shown without its password."""

    __slots__ = ("_url",)

    def __init__(self, url: str) -> None:
        if not is_store_url(url):
            raise ValueError("a store URL starts with postgresql:// or postgres://")
        try:
            port = urlsplit(url).port
        except ValueError:
            port = -1
        if port == -1:
            raise ValueError("the port in the store's URL is not a number from 0 to 65535")
        self._url = url

    @property
    def conninfo(self) -> str:
        """The URL itself, password included: only to connect with, never to print."""
        return self._url

    def __str__(self) -> str:
        return redact(self._url)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"StoreURL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreURL) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(str))

    @classmethod
    def _validate(cls, value: object) -> StoreURL:
        if isinstance(value, StoreURL):
            return value
        if isinstance(value, str):
            return cls(value)
        raise ValueError("expected a store URL")


def parse_store(value: object) -> object:
    """`store:` as written: a PostgreSQL URL becomes a `StoreURL`, anything else is left to
    be read as a path."""
    if isinstance(value, str) and is_store_url(value.strip()):
        return StoreURL(value.strip())
    return value


def is_postgres(store: Path | StoreURL) -> bool:
    """Whether the store is a PostgreSQL one."""
    return isinstance(store, StoreURL)


def store_url(store: Path | StoreURL) -> StoreURL:
    """The store's URL; a `ConfigError` for a SQLite store (a command that needs a server)."""
    if isinstance(store, StoreURL):
        return store
    from flow.errors import ConfigError

    raise ConfigError(f"store: {store} is a SQLite file, which one process at a time "
                      "writes; `flow plan` and `flow worker` need a PostgreSQL store: "
                      "store: postgresql://user@host/database (pip install 'flow[postgres]')")


def sqlite_path(store: Path | StoreURL, command: str) -> Path:
    """The store's SQLite file; a `ConfigError` naming `command` for a PostgreSQL store."""
    if isinstance(store, Path):
        return store
    from flow.errors import ConfigError

    raise ConfigError(f"store: {store} is a PostgreSQL store; {command} reads a SQLite store "
                      "only (read this one with `flow status`, `flow export` or psql)")
