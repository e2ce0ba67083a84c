"""The errors flow raises, one small tree.

    FlowError                   anything flow reports to a person
    +-- ConfigError             the pipeline file or the command line is wrong (exit 2)
    +-- SourceError             the input file cannot be read at all (exit 2)
    +-- StoreError              the store cannot be opened or written
    |   +-- StoreLockedError    another live run holds the store
    +-- MissingExtraError       a command needs an optional extra that is not installed (exit 2)
    +-- FatalCallError          no request can succeed (a refused key, no quota, no file
    |                           descriptor left for a connection): stop the run (exit 2)
    +-- RetryableError          an attempt failed; another attempt may succeed
    |   +-- RateLimitedError    429: pause every sender; never counts toward max_tries
    +-- ItemError               one item failed; recorded with its reason, the run goes on
        +-- RowError            the input row is malformed
        +-- TemplateError       the row lacks a field a template needs
        +-- RequestError        the server refused the request (400, 403, 404, 422, ...)
        +-- ResponseError       the reply is unusable (cut short, filtered, refused)
        +-- PostError           a post step could not turn the reply into output
            +-- SchemaError     the reply does not match `call.schema`, after its re-asks

Retryable or not is the branch an error sits on: `backoff` retries `RetryableError` and gives
up on everything else. Errors of a call carry `error_class`, the name stored in the store;
for HTTP statuses it is the name the openai SDK gives that status (`BadRequestError`,
`InternalServerError`, ...), so `--error-class` reads the same whichever way a call failed.
Every message says where (file, key path, row, item id) and, where it can, what to do.
"""

from __future__ import annotations


class FlowError(Exception):
    """Base of every error flow reports to a person."""


class ConfigError(FlowError):
    """The pipeline file or the command line is wrong."""


class SourceError(FlowError):
    """The input file cannot be opened or read."""


class StoreError(FlowError):
    """The store cannot be opened, migrated or written."""


class StoreLockedError(StoreError):
    """Another live run is using the store."""


class MissingExtraError(FlowError):
    """A command needs an optional extra (`flow[browse]`) that is not installed."""


class FatalCallError(FlowError):
    """No request can succeed (bad key, no quota, too many open files): retrying cannot help."""


class RetryableError(FlowError):
    """An attempt failed in a way another attempt may fix (5xx, 408, 409, timeouts, drops)."""

    def __init__(self, message: str, error_class: str, status_code: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class RateLimitedError(RetryableError):
    """429: the server asks every sender to slow down."""


class ItemError(FlowError):
    """One item failed; the run records it and goes on."""

    @property
    def error_class(self) -> str:
        """The name stored in the `error_class` column."""
        return type(self).__name__


class RowError(ItemError):
    """The input row is malformed (bad JSON, not an object, wrong encoding)."""


class TemplateError(ItemError):
    """A template could not be rendered for this row."""


class RequestError(ItemError):
    """The server refused the request as it is; sending it again cannot help."""

    def __init__(self, message: str, error_class: str, status_code: int,
                 param: str | None = None) -> None:
        super().__init__(message)
        self._error_class = error_class
        self.status_code = status_code
        self.param = param  # the part of the request the server named as at fault

    @property
    def error_class(self) -> str:
        """The openai SDK's name for the status (`BadRequestError`, `NotFoundError`, ...)."""
        return self._error_class


class ResponseError(ItemError):
    """The reply carries no usable output (cut short, filtered, refused, too large)."""


class PostError(ItemError):
    """A post step failed on the reply."""


class SchemaError(PostError):
    """The reply is not JSON that matches the stage's `schema` (after every re-ask)."""
