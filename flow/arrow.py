"""The optional extra `flow[parquet]`, imported only where Parquet is read or written.

A run reads its Parquet input with `arro3-io` (arrow-rs): it imports in a few MB and streams a
file in flat memory, where `pyarrow` costs some 50 MB in the run's process before the first
row (bench/parquet.py). `flow export` writes typed Parquet with `pyarrow`.
"""

from __future__ import annotations

from types import ModuleType

from flow.errors import MissingExtraError

EXTRA_HINT = "pip install 'flow[parquet]'"


def require_pyarrow(what: str) -> tuple[ModuleType, ModuleType]:
    """`pyarrow` and `pyarrow.parquet`, or a `MissingExtraError` naming `what` needs them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingExtraError(f"{what} needs pyarrow, an optional extra: "
                                f"{EXTRA_HINT}") from None
    # the C allocator gives freed buffers back; pyarrow's default (mimalloc) kept ~35 MB
    # more resident while a million rows streamed through (bench/parquet.py)
    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return pyarrow, pyarrow.parquet


def require_parquet_reader(what: str) -> ModuleType:
    """`arro3.io` (its `read_parquet`), or a `MissingExtraError` naming `what` needs it."""
    try:
        import arro3.io
    except ImportError:
        raise MissingExtraError(f"{what} needs arro3-io, an optional extra: "
                                f"{EXTRA_HINT}") from None
    return arro3.io
