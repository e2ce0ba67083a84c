"""Read a store: status counts, failures and one item in full (`export.py` writes results).

These open the store read-only with the standard `sqlite3` module, so they work while a run
is writing (WAL readers never block the writer) and on a read-only mount, and never change
what they read. They read only what `docs/store.md` documents (the `results` view and the
tables beneath it), the same SQL a person would write.

Each takes the pipeline's stage names in order. A chain is read stage by stage; what it says
of a whole item is its last stage's word on the items of its first (an item has a row at a
later stage only once it has reached it, so a missing row there is pending).
"""

from __future__ import annotations

import heapq
import itertools
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flow.config.store_url import StoreURL
from flow.endpoints.embeddings import is_item_body
from flow.errors import ConfigError, StoreError
from flow.reask_shape import earlier_keys
from flow.records import STAGE
from flow.store.quoting import sql_text
from flow.store.read_only import read_only_uri
from flow.vectors import vector_summary

FAILURE_COLUMNS = ("id", "row", "error_class", "error", "attempts")


class Database(Protocol):
    """A read-only connection: SQLite's own, or `flow.store.postgres.reading.Reader`."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


@contextmanager
def open_read_only(path: Path | StoreURL) -> Iterator[Database]:
    """The store at `path`, read-only; a clear error when there is none yet."""
    if isinstance(path, StoreURL):
        from flow.store.postgres.reading import Reader

        reader = Reader(path)
        try:
            yield reader
        finally:
            reader.close()
        return
    if not path.exists():
        raise StoreError(f"{path}: no store yet; run the pipeline first")
    uri = read_only_uri(path)
    try:
        db = sqlite3.connect(uri, uri=True)
        db.execute("PRAGMA mmap_size=4294967296")
        db.execute("SELECT 1 FROM items LIMIT 1")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from None
    try:
        db.execute("SELECT 1 FROM outputs LIMIT 1")
    except sqlite3.Error:
        db.close()
        raise StoreError(f"{path}: written by an older flow; `flow run` the pipeline once "
                         "to upgrade the store (finished items are not called again)") from None
    try:
        yield db
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from None
    finally:
        db.close()


def stage_named(stages: Sequence[str], name: str) -> str:
    """`name` if the pipeline has a stage of that name, else a ConfigError naming them."""
    if name not in stages:
        raise ConfigError(f"--stage: the pipeline has no stage {name!r}; its stages are "
                          + ", ".join(stages))
    return name


@dataclass
class _Tally:
    """One stage's results counted: by status, failed by class, done by origin, and spend."""

    by_status: dict[str, int] = field(default_factory=dict)
    by_error: dict[str, int] = field(default_factory=dict)
    by_origin: dict[str, int] = field(default_factory=dict)
    failed_here: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


def store_status(path: Path | StoreURL, stages: Sequence[str] = (STAGE,)) -> dict[str, Any]:
    """Counts by status and error class, tokens and cost, and the history of runs.

    Money is read from `responses`, where each paid reply is counted once: the runs' cost,
    the budget cap and the total here are the same sum. The part of it that bought the
    current results is the sum of the `results` view's `cost_usd`; the rest paid for
    requests no item renders any more (an edited template, a re-bought reply).

    For a chain the counts are the last stage's over the first stage's items, and `stages`
    counts each stage (`failed_here`: failed at that stage, not stopped by an earlier one).
    """
    chained = len(stages) > 1
    with open_read_only(path) as db:
        tallies = [_tally(db, stage, chained) for stage in stages]
        (truncated,) = db.execute(
            "SELECT COUNT(*) FROM outputs WHERE stage = ? AND truncated <> 0" if not chained else
            f"SELECT COUNT(*) FROM outputs WHERE stage IN ({', '.join('?' * len(stages))}) "
            "AND truncated <> 0", tuple(stages)).fetchone()
        if not chained:
            tallies[0].by_origin = dict(db.execute(
                f"SELECT origin, COUNT(*) FROM results WHERE stage = {sql_text(stages[0])} "
                "AND status = 'done' GROUP BY origin").fetchall())
        prompt, completion, cost, replies = db.execute(
            "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost_usd), 0), COUNT(*) FROM responses").fetchone()
        runs = [dict(zip(("id", "started_at", "finished_at", "state", "origin", "items_done",
                          "items_failed", "items_skipped", "calls_made", "cost_usd"), row))
                for row in db.execute(
                    "SELECT id, started_at, finished_at, state, origin, items_done, "
                    "items_failed, items_skipped, calls_made, cost_usd FROM runs ORDER BY id")]
        batches = _batches(db)
        shared = None
        if isinstance(path, StoreURL):
            from flow.workers.status import worker_status

            shared = worker_status(db)
    items = sum(tallies[0].by_status.values())
    last = tallies[-1]
    counts: dict[str, Any] = {name: last.by_status.get(name, 0)
                              for name in ("done", "failed", "pending")}
    if chained:
        counts["skipped"] = last.by_status.get("skipped", 0)
        counts["pending"] = items - counts["done"] - counts["failed"] - counts["skipped"]
        counts["stages"] = [_stage_counts(name, tally, items)
                            for name, tally in zip(stages, tallies)]
    if batches:
        counts["batches"] = batches
    if shared is not None:
        counts.update(shared)
    by_error = dict(sorted(last.by_error.items(), key=lambda item: -item[1]))
    return {"store": str(path), "items": items, **counts,
            "failed_by_error_class": by_error, "done_by_origin": last.by_origin,
            "truncated": truncated,
            "tokens": {"prompt": prompt, "completion": completion},
            "cost_usd": round(cost, 6),
            "cost_of_results_usd": round(sum(tally.cost for tally in tallies), 6),
            "replies_paid": replies,
            "attempts": sum(run["calls_made"] for run in runs), "runs": runs}


BATCH_COLUMNS = ("shard", "stage", "state", "status", "batch_id", "lines", "completed",
                 "failed", "created_at", "updated_at", "error", "cost_usd")


def _batches(db: Database) -> list[dict[str, Any]]:
    """Each batch the Batch API executor made: its state, counts, age and cost so far."""
    try:
        rows = db.execute(
            "SELECT id, stage, state, status, batch_id, lines, completed, failed, created_at, "
            "updated_at, error, (SELECT COALESCE(SUM(cost_usd), 0) FROM responses "
            "WHERE responses.batch_id = batches.batch_id) FROM batches ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # a store from before batches
        return []
    return [dict(zip(BATCH_COLUMNS, row)) for row in rows]


def _batch_of(db: Database, response_id: int) -> str | None:
    """The Batch API batch a reply came through, if it did."""
    try:
        found = db.execute("SELECT batch_id FROM responses WHERE id = ?",
                           (response_id,)).fetchone()
    except sqlite3.OperationalError:  # a store from before batches
        return None
    return None if found is None or found[0] is None else str(found[0])


def _tally(db: Database, stage: str, chained: bool) -> _Tally:
    """One pass over a stage's results; `stage` lets SQLite read items through a covering
    index. One stage reads what it always did (and so a store from before chains)."""
    tally = _Tally()
    if chained:
        rows = db.execute(
            "SELECT status, error_class, COUNT(*), SUM(cost_usd), stopped_at IS NULL, "
            "SUM(prompt_tokens), SUM(completion_tokens), origin FROM results "
            f"WHERE stage = {sql_text(stage)} GROUP BY 1, 2, 5, 8").fetchall()
    else:
        rows = [(*row, True, 0, 0, None) for row in db.execute(
            "SELECT status, error_class, COUNT(*), SUM(cost_usd) FROM results "
            f"WHERE stage = {sql_text(stage)} GROUP BY 1, 2")]
    for status, error_class, count, cost, here, prompt, completion, origin in rows:
        tally.by_status[status] = tally.by_status.get(status, 0) + count
        tally.cost += cost or 0.0
        tally.prompt_tokens += prompt or 0
        tally.completion_tokens += completion or 0
        if status == "failed":
            tally.by_error[error_class] = tally.by_error.get(error_class, 0) + count
            tally.failed_here += count if here else 0
        if chained and status == "done":
            tally.by_origin[origin] = tally.by_origin.get(origin, 0) + count
    return tally


def _stage_counts(stage: str, tally: _Tally, items: int) -> dict[str, Any]:
    """A stage's line in `flow status`: an item with no row there yet is pending there."""
    done, failed, skipped = (tally.by_status.get(name, 0)
                             for name in ("done", "failed", "skipped"))
    return {"stage": stage, "done": done, "failed": failed,
            "pending": items - done - failed - skipped, "skipped": skipped,
            "failed_here": tally.failed_here, "prompt_tokens": tally.prompt_tokens,
            "completion_tokens": tally.completion_tokens, "cost_usd": round(tally.cost, 6)}


def list_failures(path: Path | StoreURL, error_class: str | None = None, limit: int | None = None,
                  stages: Sequence[str] = (STAGE,), stage: str | None = None
                  ) -> list[dict[str, Any]]:
    """Failed items in input order, with error class, message and attempts.

    In a chain, each failure at the stage where it happened (not again at the later stages
    it stopped), with that `stage`; `stage` keeps one stage's.
    """
    chained = len(stages) > 1
    shown = [stage_named(stages, stage)] if stage is not None else list(stages)
    where = " AND error_class=?" if error_class else ""
    if chained:
        where = " AND stopped_at IS NULL" + where
    with open_read_only(path) as db:
        # each stage in input order, merged: a stage's failures read as one stage's do
        per_stage = [
            [(row[1], order, name, row) for row in db.execute(
                "SELECT item_id, row, error_class, error, attempts FROM results "
                f"WHERE stage = {sql_text(name)} AND status = 'failed'{where} ORDER BY row"
                + (f" LIMIT {int(limit)}" if limit else ""),
                (error_class,) if error_class else ())]
            for order, name in enumerate(shown)]
    merged = itertools.islice(heapq.merge(*per_stage), limit or None)
    if not chained:
        return [dict(zip(FAILURE_COLUMNS, row)) for _, _, _, row in merged]
    return [{"id": row[0], "stage": name, **dict(zip(FAILURE_COLUMNS[1:], row[1:]))}
            for _, _, name, row in merged]


def show_item(path: Path | StoreURL, item_id: str, stages: Sequence[str] = (STAGE,)) -> dict[str, Any]:
    """One item in full: input, the exact request, the raw reply, output, every attempt.

    For a chain: the input once, the item's status (its last stage's), and each stage in
    full; a stage it has not reached yet is pending there.
    """
    with open_read_only(path) as db:
        if len(stages) == 1:
            item = _show_stage(db, stages[0], item_id, chained=False)
            if item is None:
                raise ConfigError(f"{path}: no item with id {item_id!r}")
            return item
        found = db.execute("SELECT row, input FROM items WHERE stage = ? AND item_id = ?",
                           (stages[0], item_id)).fetchone()
        if found is None:
            raise ConfigError(f"{path}: no item with id {item_id!r}")
        shown = [_show_stage(db, stage, item_id, chained=True) or
                 {"stage": stage, "status": "pending"} for stage in stages]
    return {"id": item_id, "row": found[0], "input": json_or_text(found[1]),
            "status": shown[-1]["status"], "stages": shown}


def _show_stage(db: Database, stage: str, item_id: str,
                chained: bool) -> dict[str, Any] | None:
    """The item at one stage, or None when it has no row there."""
    found = db.execute(
        "SELECT items.row, items.input, items.request_key, items.origin, "
        "results.status, results.output, results.error_class, results.error, "
        "results.response_id, results.cost_usd, results.truncated, "
        f"{'results.stopped_at' if chained else 'NULL'} FROM items JOIN results "
        "ON results.stage = items.stage AND results.item_id = items.item_id "
        "WHERE items.stage = ? AND items.item_id = ?", (stage, item_id)).fetchone()
    if found is None:
        return None
    (row, raw_input, key, origin, status, output, error_class, error, response_id,
     paid, truncated, stopped_at) = found
    head = ({"stage": stage} if chained else
            {"id": item_id, "stage": stage, "row": row, "input": json_or_text(raw_input)})
    item: dict[str, Any] = {**head, "request_key": key, "status": status,
                            "output": json_or_text(output), "truncated": bool(truncated),
                            "error_class": error_class, "error": error}
    if chained:
        item["stopped_at"] = stopped_at
    # the reply its output was made from: one to its request, or to a re-ask of it
    reply = db.execute(
        "SELECT id, model, request, body, prompt_tokens, completion_tokens, cost_usd, "
        "attempts, latency_ms, started_at, finished_at, run_id, request_key FROM responses "
        "WHERE origin=? AND (id=? OR (? IS NULL AND request_key=?)) ORDER BY id DESC LIMIT 1",
        (origin, response_id, response_id, key)).fetchone()
    if reply is not None:
        (reply_id, model, request, body, prompt, completion, cost, attempts, latency,
         started, finished, run_id, reply_key) = reply
        asked = json_or_text(request)
        if reply_key != key and isinstance(asked, dict):
            # a re-ask's reply: the replies that broke the schema first, each re-ask's too
            item["replies_before_reask"] = [
                {"response_id": i, "response": json_or_text(b), "cost_usd": c}
                for earlier in earlier_keys(asked, key)
                for i, b, c in db.execute("SELECT id, body, cost_usd FROM responses WHERE "
                                          "request_key=? AND origin=? ORDER BY id",
                                          (earlier, origin))]
        item.update(model=model, request=asked, response=json_or_text(body),
                    response_id=reply_id, tokens={"prompt": prompt, "completion": completion},
                    cost_usd=cost, paid_by_this_item=bool(paid) or cost in (None, 0),
                    latency_ms=latency, started_at=started, finished_at=finished)
        if is_item_body(item["response"]):
            item["embedding"] = vector_summary(db, reply_id)
        batch_id = _batch_of(db, reply_id)
        if batch_id is not None:
            item["batch_id"] = batch_id  # it came through the Batch API
    item["attempts"] = [
        dict(zip(("run", "number", "started_at", "latency_ms", "status_code",
                  "outcome", "error", "wait_s"), attempt))
        for attempt in db.execute(
            "SELECT run_id, number, started_at, latency_ms, status_code, outcome, "
            "error, wait_s FROM attempts WHERE request_key=? AND origin=? "
            "ORDER BY started_at, number", (key, origin))]
    if not item["attempts"] and reply is not None and attempts == 1:
        # a reply at its first attempt: its `responses` row says it all
        item["attempts"] = [{"run": run_id, "number": 1, "started_at": started,
                             "latency_ms": latency, "status_code": 200, "outcome": "ok",
                             "error": None, "wait_s": None}]
    return item


def json_or_text(text: str | None) -> Any:
    """A stored JSON column's value; text that is not JSON as it is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_json(value: Any) -> str:
    """Pretty JSON for people."""
    return json.dumps(value, indent=2, ensure_ascii=False)
