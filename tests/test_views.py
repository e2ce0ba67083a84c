"""The views people read: `results.output_text`, and `browse` in input order with the fields."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from flow.store.migrations import prepare_store
from flow.store.views import MAX_FIELDS, browse_view_sql, field_columns, refresh_browse_view

ROWS = [  # input order unlike id order
    {"id": "c", "question": "Is it?", "lang": "en"},
    {"id": "a", "question": "Est-ce ?", "lang": "fr", "meta": {"source": "web"}},
    {"id": "b", "question": "Ist es?", "lang": "de"},
]


def columns(db: sqlite3.Connection, view: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({view})")]


def browse(pipeline: Any) -> tuple[list[str], list[dict[str, Any]]]:
    with sqlite3.connect(pipeline.store) as db:
        cursor = db.execute("SELECT * FROM browse")
        names = [column[0] for column in cursor.description]
        return names, [dict(zip(names, row)) for row in cursor.fetchall()]


def test_output_text_is_a_string_output_as_plain_text(make_pipeline, simulator) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url,
                             post=["strip", {"regex": "(You asked)"}])
    assert pipeline.run() == 0
    assert pipeline.query("SELECT COUNT(*) FROM results WHERE output = 'You asked'") == [(0,)]
    assert pipeline.query("SELECT item_id FROM results WHERE output_text = 'You asked' "
                          "ORDER BY row") == [("c",), ("a",), ("b",)]
    assert pipeline.query("SELECT DISTINCT output FROM results") == [('"You asked"',)]


def test_output_text_is_null_for_an_output_that_is_no_string(make_pipeline,
                                                             simulator) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url, post=["json"],
                             call={"params": {"response_format": {"type": "json_object"}}})
    assert pipeline.run() == 0
    for output, text in pipeline.query("SELECT output, output_text FROM results"):
        assert isinstance(json.loads(output), dict) and text is None
    _, rows = browse(pipeline)
    assert [json.loads(row["output"])["answer"] for row in rows]  # JSON, as it is


def test_browse_shows_items_in_input_order_with_a_column_per_field(make_pipeline,
                                                                   simulator) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url)
    with (pipeline.folder / "rows.jsonl").open("a") as rows_file:
        rows_file.write("not json\n")
    assert pipeline.run() == 1
    names, rows = browse(pipeline)
    # the id field is `item_id` already; every other field has a column, in order of coming
    assert names == ["row", "item_id", "question", "lang", "meta", "output", "status",
                     "truncated", "error_class", "error", "cost_usd", "prompt_tokens",
                     "completion_tokens", "model", "finished_at", "input"]
    assert [row["item_id"] for row in rows] == ["c", "a", "b", "#row4"]
    assert [row["question"] for row in rows] == ["Is it?", "Est-ce ?", "Ist es?", None]
    assert json.loads(rows[1]["meta"]) == {"source": "web"}
    assert json.loads(rows[1]["input"]) == ROWS[1]
    texts = dict(pipeline.query("SELECT item_id, output_text FROM results"))
    costs = dict(pipeline.query("SELECT item_id, cost_usd FROM results"))
    for row in rows[:3]:
        assert row["status"] == "done" and row["output"] == texts[row["item_id"]]
        assert not row["output"].startswith('"')
        assert row["cost_usd"] == round(costs[row["item_id"]], 6) > 0
        assert len(repr(row["cost_usd"])) <= len("0.000001") + 1
    assert (rows[3]["status"], rows[3]["error_class"], rows[3]["input"]) == (
        "failed", "RowError", None)


def test_browse_is_made_again_when_the_fields_change(make_pipeline, simulator) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url)
    assert pipeline.run() == 0
    with sqlite3.connect(pipeline.store) as db:
        assert refresh_browse_view(db) is False  # the run left it up to date
    pipeline = make_pipeline(rows=[{**row, "topic": "x"} for row in ROWS],
                             base_url=simulator.url)
    assert pipeline.run() == 0
    names, rows = browse(pipeline)
    assert names[2:6] == ["question", "lang", "topic", "meta"]
    assert [row["topic"] for row in rows] == ["x", "x", "x"]


def test_browse_of_the_migration_is_the_one_made_for_a_store_without_fields(
        tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    prepare_store(path)
    with sqlite3.connect(path, isolation_level=None) as db:
        from_migration = columns(db, "browse")
        assert refresh_browse_view(db) is True
        assert columns(db, "browse") == from_migration
        assert refresh_browse_view(db) is False


def test_fields_named_like_a_column_of_browse_are_renamed() -> None:
    fields = ["status", "Row", "question", 'say "hi"', "", "tab\there", "input_status"]
    assert field_columns(fields) == [("status", "input_status"), ("Row", "input_Row"),
                                     ("question", "question"),
                                     ("input_status", "input_input_status")]
    # a renamed field whose new name is taken too stays in `input` only
    assert field_columns(["input_status", "status"]) == [("input_status", "input_status")]


def test_browse_has_at_most_max_fields_field_columns() -> None:
    fields = [f"f{number}" for number in range(MAX_FIELDS + 10)]
    assert [column for _, column in field_columns(fields)] == fields[:MAX_FIELDS]


def test_a_field_with_quotes_or_dots_is_read_by_its_whole_name(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    prepare_store(path)
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("INSERT INTO items VALUES ('call', 'x', 1, ?, NULL, 'o', NULL, NULL, 't', 0, "
                   "NULL)",
                   (json.dumps({"it's": 1, "a.b": 2, "a": {"b": 3}}),))
        db.execute("DROP VIEW browse")
        db.execute(browse_view_sql(["it's", "a.b", "a"]))
        assert db.execute('SELECT "it\'s", "a.b", a FROM browse').fetchone() == (
            1, 2, '{"b":3}')
