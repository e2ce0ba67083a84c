"""`flow browse`: the store in Datasette, labelled and described, `browse` faceted by status.

Datasette is an optional extra (`pip install 'flow[browse]'`), run as a child process on the
store with the metadata made here: a title and a description for every table and view,
what each column of the two views people read means (`browse` and `results`, folded under
their description, so the rows come first), and facets on status and error class shown by
default. The store is opened read-only, never immutable: Datasette reads it live beside a
run (WAL readers see each commit).
"""

from __future__ import annotations

import html
import importlib.util
import json
import sqlite3
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flow.errors import MissingExtraError, StoreError
from flow.store.views import OUTPUT_SUFFIX

FACETS = ["status", "error_class"]
URL_SAFE = string.ascii_letters + string.digits + "_-"
# Datasette counts a view's rows for its suggested facets with no time limit of its own: on
# a store of a million items that count outlasts `sql_time_limit_ms` and the whole page
# fails. Without suggestions, a count or a facet that takes too long is left out of the page
# and the rows still come at once; a second, not a fifth, lets the two facets finish on
# stores of a few hundred thousand items. Any column is one click from a facet in its menu.
SETTINGS = {"suggest_facets": "off", "facet_time_limit_ms": "1000"}

TABLES: dict[str, tuple[str, str]] = {
    "browse": ("Results, for reading",
               "One row per input row, in input order: each input field in a column of its "
               "own, the output as plain text when it is a string, the cost rounded to a "
               "millionth of a dollar."),
    "results": ("Results",
                "One row per item and stage, as flow's own commands read it: outputs are JSON "
                "(output_text is a string output as plain text), costs unrounded."),
    "runs": ("Runs", "One row per flow run: when, how it ended, what it did and spent."),
    "items": ("Items", "One row per input row and stage: its fields, as JSON, and the "
                       "request it renders to."),
    "responses": ("Paid replies", "Every reply paid for, once, never changed or removed, "
                                  "with its tokens and cost."),
    "outputs": ("Outputs", "What each item made of its request's reply, or why it failed."),
    "attempts": ("Attempts", "HTTP attempts of the calls that needed more than one, or got "
                             "no reply."),
    "migrations": ("Migrations", "The schema migrations applied to this store."),
    "batches": ("Batches", "One row per shard of calls sent through the Batch API: its state "
                           "(planned, uploaded, creating, submitted, terminal, collected), the "
                           "provider's batch and status, and its counts."),
    "batch_lines": ("Batch lines", "The requests each batch holds, by content key, and "
                                   "whether each was collected or sent again."),
    "store_info": ("Store", "The store's own id, which names it in each batch's metadata."),
    "vectors": ("Vectors", "One embedding per reply of an embeddings stage: its dimensions "
                           "and its float32 bytes (flow export writes them as lists)."),
}

STATUS = "done, failed, pending, or skipped (a stage's when: was false)"
COLUMNS: dict[str, dict[str, str]] = {
    "browse": {
        "row": "line in the input file where the row starts",
        "item_id": "the item's id: the value of load.id, or the row number",
        "output": "the output: plain text when it is a string, else JSON",
        "status": STATUS,
        "truncated": "1 when its output was made from a reply cut short at max_tokens",
        "error_class": "why it failed, e.g. BadRequestError, PostError, RowError",
        "error": "what went wrong",
        "cost_usd": "dollars, rounded to 6 places, when this item bought its reply "
                    "(0 when it reused another item's)",
        "prompt_tokens": "tokens in, when this item bought its reply",
        "completion_tokens": "tokens out, likewise",
        "model": "the model",
        "finished_at": "when its output was made (UTC)",
        "input": "every field of the input row, JSON",
    },
    "results": {
        "stage": "the call stage",
        "item_id": "the item's id",
        "row": "line in the input file where the row starts",
        "status": STATUS,
        "output": "the output, JSON (a string output keeps its quotes)",
        "output_text": "the output as plain text when it is a string; empty otherwise",
        "truncated": "1 when its output was made from a reply cut short at max_tokens",
        "error_class": "why it failed",
        "error": "what went wrong",
        "prompt_tokens": "tokens in, when this item bought its reply (else 0)",
        "completion_tokens": "tokens out, likewise",
        "cost_usd": "dollars, likewise: summed, the cost of the current results",
        "model": "the model",
        "attempts": "HTTP attempts its call made",
        "latency_ms": "time its call took, when it bought the reply",
        "finished_at": "when its output was made (UTC)",
        "origin": "the endpoint, or simulator",
        "response_id": "the reply its output came from (shared by items that render the "
                       "same request)",
        "stopped_at": "the earlier stage whose failure stopped the item before this one",
    },
}


def has_datasette() -> bool:
    """Whether Datasette, the `browse` extra, is installed."""
    return importlib.util.find_spec("datasette") is not None


def browse_columns(store: Path) -> list[str]:
    """The columns of the store's `browse` view; a `StoreError` when it cannot show one."""
    if not store.exists():
        raise StoreError(f"{store}: no store yet; run the pipeline first")
    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"{store}: cannot read the store: {e}") from None
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(browse)")]
    except sqlite3.Error as e:
        raise StoreError(f"{store}: cannot read the store: {e}") from None
    finally:
        db.close()
    if not columns:
        raise StoreError(f"{store}: written by an older flow; `flow run` the pipeline once "
                         "to upgrade the store (finished items are not called again)")
    return columns


def datasette_metadata(store: Path, pipeline: Path, columns: list[str],
                       stages: Sequence[str] = ()) -> dict[str, Any]:
    """Datasette's metadata for `store`, whose `browse` view has `columns`; `stages` are the
    pipeline's stages, in order (each earlier one's output has a column)."""
    outputs = {name + OUTPUT_SUFFIX: f"the output of stage {name}, before the last stage's"
               for name in stages[:-1]}
    described = {column: COLUMNS["browse"].get(column) or outputs.get(column, "an input field")
                 for column in columns}
    tables: dict[str, dict[str, Any]] = {
        name: {"title": title, "description": description}
        for name, (title, description) in TABLES.items()}
    for view, meanings in (("browse", described), ("results", COLUMNS["results"])):
        tables[view].update(description_html=_described(TABLES[view][1], meanings),
                            facets=FACETS)
    tables["outputs"]["facets"] = FACETS
    tables["attempts"]["facets"] = ["outcome"]
    tables["runs"].update(facets=["state"], sort_desc="id")
    tables["items"]["sort"] = "row"
    return {"title": f"flow: {pipeline.name}",
            "description": f"The store of {pipeline.name}. Start with the browse view: one "
                           "row per input row, in input order.",
            "databases": {store.stem: {"tables": tables}}}


def _described(description: str, columns: dict[str, str]) -> str:
    """The description, then what each column means, folded away: the rows come first."""
    items = "".join(f"<dt>{html.escape(column)}</dt><dd>{html.escape(meaning)}</dd>"
                    for column, meaning in columns.items())
    return (f"<p>{html.escape(description)}</p><details><summary>What the columns mean"
            f"</summary><dl class=\"column-descriptions\">{items}</dl></details>")


def browse_url(store: Path, host: str, port: int, columns: list[str]) -> str:
    """The address of the `browse` view once Datasette serves `store`.

    When the input's fields have columns of their own (`columns` holds more than the view's
    fixed ones), the `input` JSON column repeats them and is hidden: Datasette's column menu
    shows it again.
    """
    # Datasette names a database after its file, tilde-encoded in its addresses
    name = "".join(chr(byte) if chr(byte) in URL_SAFE else "+" if byte == 32 else f"~{byte:02X}"
                   for byte in store.stem.encode("utf-8"))
    has_fields = any(column not in COLUMNS["browse"] for column in columns)
    return f"http://{host}:{port}/{name}/browse" + ("?_nocol=input" if has_fields else "")


def serve_store(store: Path, pipeline: Path, host: str, port: int,
                on_start: Callable[[str], None], stages: Sequence[str] = ()) -> int:
    """Run Datasette on `store` until it stops (Ctrl-C), telling `on_start` the address of
    the `browse` view first; Datasette's exit code."""
    if not has_datasette():
        raise MissingExtraError("flow browse needs Datasette, an optional extra: "
                                "pip install 'flow[browse]'")
    columns = browse_columns(store)
    metadata = datasette_metadata(store, pipeline, columns, stages)
    with tempfile.TemporaryDirectory(prefix="flow-browse-") as folder:
        metadata_file = Path(folder) / "metadata.json"
        metadata_file.write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        on_start(browse_url(store, host, port, columns))
        settings = [arg for name, value in SETTINGS.items() for arg in ("--setting", name, value)]
        return subprocess.run([
            sys.executable, "-m", "datasette", "serve", str(store), "--metadata",
            str(metadata_file), "--host", host, "--port", str(port), *settings]).returncode
