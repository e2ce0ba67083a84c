"""A store written by the previous release (0.1.0) migrates in place and keeps every result.

`data/store_release_0_1_0.sql` is the `iterdump()` of a store made by the real 0.1.0 (commit
88f6b42, one `calls` table) with `--simulate`, from `data/store_release_0_1_0/`:

1. rows.jsonl without its last two rows, and pipeline.yaml with `post: [strip, regex]`
   (without the `lower` step): `flow run pipeline.yaml --simulate`;
2. `lower` appended to `post`, the two rows put back: the same command again. 0.1.0 reposted
   every stored reply and its INSERT OR REPLACE wiped their tokens, cost and run.

Then `runs.pipeline` was set to "pipeline.yaml" (it held this machine's absolute path).

What the store holds, by item: q01-q03, q10-q12 done; q04 and q05 render the same request and
share one `calls` row; q06 cut short (`[sim:finish=length]`); q07 a post step failed (the
regex does not match); q08 a 400 (`[sim:status=400]`); row 9 is not valid JSON.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from flow.cli import main
from flow.prices import cost_usd, price_for

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "store_release_0_1_0"
DUMP = DATA / "store_release_0_1_0.sql"


def query(store: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(store)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.fixture
def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The fixture folder in tmp_path with its store rebuilt from the dump: (pipeline, store)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    folder = tmp_path / "job"
    shutil.copytree(FIXTURE, folder)
    store = folder / "flow.db"
    db = sqlite3.connect(store)
    try:
        db.executescript(DUMP.read_text(encoding="utf-8"))
    finally:
        db.close()
    return folder / "pipeline.yaml", store


def results(store: Path) -> dict[str, tuple[Any, ...]]:
    return {item_id: (status, output, error_class) for item_id, status, output, error_class
            in query(store, "SELECT item_id, status, output, error_class FROM results")}


def last_run(store: Path) -> tuple[int, int]:
    ((run_id, calls_made),) = query(store, "SELECT id, calls_made FROM runs "
                                           "ORDER BY id DESC LIMIT 1")
    return run_id, calls_made


def test_the_fixture_is_a_0_1_0_store(old_store: tuple[Path, Path]) -> None:
    _, store = old_store
    assert query(store, "SELECT name FROM migrations") == [("m001_create_runs_items_calls",)]
    assert query(store, "SELECT DISTINCT pipeline, origin FROM runs") == [
        ("pipeline.yaml", "simulator")]
    # the two items that render the same request share one calls row
    assert query(store, "SELECT COUNT(DISTINCT request_key), COUNT(*) FROM items "
                        "WHERE item_id IN ('q04', 'q05')") == [(1, 2)]
    # 0.1.0's repost wiped the cost of what it had paid for
    assert query(store, "SELECT COUNT(*) FROM calls WHERE response IS NOT NULL "
                        "AND cost_usd IS NULL")[0][0] > 0
    assert len(DUMP.read_bytes()) < 50_000


def test_a_0_1_0_store_migrates_keeps_every_result_and_reruns_without_paying(
        old_store: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pipeline, store = old_store
    before = results(store)
    (replies_before,) = query(store, "SELECT COUNT(*) FROM calls WHERE response IS NOT NULL")[0]
    # items that failed without a paid reply (here the 400) are called again by any plain
    # re-run, by design (docs/reliability.md, README "How resume works"); it costs nothing
    unpaid_failures = {key for (key,) in query(
        store, "SELECT items.request_key FROM items JOIN calls USING (request_key, origin) "
               "WHERE items.error_class IS NULL AND calls.status = 'failed' "
               "AND calls.response IS NULL")}
    assert len(unpaid_failures) == 1
    assert len(before) == 12
    assert sorted(i for i, (status, _, _) in before.items() if status == "done") == [
        "q01", "q02", "q03", "q04", "q05", "q10", "q11", "q12"]

    for _ in range(2):
        assert main(["run", str(pipeline), "--simulate"]) == 1  # failed items remain
        run_id, calls_made = last_run(store)
        # nothing paid: no new reply, and the only requests sent are the unpaid failures'
        assert query(store, "SELECT COUNT(*) FROM responses")[0][0] == replies_before
        attempted = query(store, f"SELECT request_key FROM attempts WHERE run_id = {run_id}")
        assert calls_made == len(attempted) == len(unpaid_failures)
        assert {key for (key,) in attempted} == unpaid_failures
        assert query(store, f"SELECT cost_usd FROM runs WHERE id = {run_id}") == [(0.0,)]

        after = results(store)
        # a bad row's generated id is `#row9` now, never a bare number a real id could hold
        after["9"] = after.pop("#row9")
        assert after.keys() == before.keys()
        # a reply cut short is kept as done now, flagged: made from the stored reply, unpaid
        status, output, error_class = after.pop("q06")
        assert (status, error_class) == ("done", None) and json.loads(output)
        assert query(store, "SELECT truncated FROM results WHERE item_id = 'q06'") == [(1,)]
        for item_id, (status, output, error_class) in before.items():
            if item_id == "q06":
                continue
            assert after[item_id][0] == status, item_id
            assert after[item_id][1] == output, item_id
            assert after[item_id][2] == error_class, item_id

    assert query(store, "SELECT name FROM migrations") == [
        ("m001_create_runs_items_calls",), ("m002_split_responses_from_outputs",),
        ("m003_results_output_text_and_browse",), ("m004_truncated_outputs",),
        ("m005_stages",), ("m006_batches",), ("m007_vectors",)]
    # the outputs were strings: their plain text sits beside the JSON, and `browse` shows it
    # beside the input's field, in input order
    for item_id, output in query(store, "SELECT item_id, output FROM results "
                                        "WHERE status = 'done'"):
        assert query(store, f"SELECT output_text FROM results WHERE item_id = '{item_id}'"
                     ) == [(json.loads(output),)]
    browsed = query(store, "SELECT item_id, question, output FROM browse")
    assert [item_id for item_id, _, _ in browsed] == [
        item_id for (item_id,) in query(store, "SELECT item_id FROM items ORDER BY row")]
    assert ("q01", "What is 1 plus 1?", "what is 1 plus 1?") in browsed
    assert not query(store, "SELECT name FROM sqlite_master WHERE name = 'calls'")
    errors = dict(query(store, "SELECT item_id, error FROM results WHERE status = 'failed'"))
    assert set(errors) == {"q07", "q08", "#row9"}
    assert before["9"][2] == "RowError" and "invalid JSON" in errors["#row9"]
    assert before["q08"][2] == "BadRequestError" and "400" in errors["q08"]
    assert before["q06"][2] == "ResponseError"  # cut short: kept as done now, flagged
    assert before["q07"][2] == "PostError"
    # the shared reply is paid once, by the first item
    assert query(store, "SELECT item_id, bought FROM outputs WHERE item_id IN ('q04', 'q05') "
                        "ORDER BY item_id") == [("q04", 1), ("q05", 0)]

    capsys.readouterr()
    assert main(["status", str(pipeline), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    ((runs_cost,),) = query(store, "SELECT SUM(cost_usd) FROM runs")
    ((replies_cost,),) = query(store, "SELECT COALESCE(SUM(cost_usd), 0) FROM responses")
    assert runs_cost == pytest.approx(replies_cost, rel=1e-9, abs=1e-12)
    assert status["cost_usd"] == round(replies_cost, 6)
    assert status["cost_usd"] == pytest.approx(runs_cost, abs=5e-7)
    assert status["replies_paid"] == replies_before
    assert (status["done"], status["failed"], status["pending"]) == (9, 3, 0)
    assert query(store, "PRAGMA integrity_check") == [("ok",)]


def test_a_0_1_0_store_keeps_what_was_paid(old_store: tuple[Path, Path]) -> None:
    pipeline, store = old_store
    assert main(["run", str(pipeline), "--simulate"]) == 1
    price = price_for("gpt-4o-mini", None)
    assert price is not None
    for reply_id, prompt, completion, cached, cost in query(
            store, "SELECT id, prompt_tokens, completion_tokens, cached_tokens, cost_usd "
                   "FROM responses WHERE model = 'gpt-4o-mini'"):
        assert cost == pytest.approx(cost_usd(price, prompt, completion, cached)), reply_id
