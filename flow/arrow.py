"""pyarrow, the optional extra `flow[parquet]`: imported where Parquet is read or written."""

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
