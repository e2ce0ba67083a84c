"""The errors flow raises, one small tree.

    FlowError                 anything flow reports to a person
    +-- ConfigError           the pipeline file or the command line is wrong (exit 2)
    +-- SourceError           the input file cannot be read at all (exit 2)
    +-- StoreError            the SQLite store cannot be opened or written
    |   +-- StoreLockedError  another live run holds the store
    +-- FatalCallError        the endpoint refuses every request: stop the run (exit 2)
    +-- ItemError             one item failed; recorded with its reason, the run goes on
        +-- RowError          the input row is malformed
        +-- TemplateError     the row lacks a field a template needs
        +-- PostError         a post step could not turn the response into output
        +-- ResponseError     the response is unusable (empty, cut short, filtered)

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
    """The SQLite store cannot be opened, migrated or written."""


class StoreLockedError(StoreError):
    """Another live run is using the store."""


class FatalCallError(FlowError):
    """The endpoint refuses every request (bad key, no quota): retrying cannot help."""


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


class PostError(ItemError):
    """A post step failed on the response."""


class ResponseError(ItemError):
    """The response carries no usable text (cut short, filtered, malformed)."""
