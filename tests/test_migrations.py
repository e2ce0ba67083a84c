"""The schema the migrations create is the one docs/store.md documents."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from flow.store.migrations import prepare_store

DOC = Path(__file__).resolve().parent.parent / "docs" / "store.md"
VIEWS = ("results", "browse")  # their columns' types come from what they hold


def documented_schema() -> dict[str, list[tuple[str, str]]]:
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"### `(\w+)`", line)
        if heading:
            current = heading.group(1)
            tables[current] = []
            continue
        column = re.match(r"\| `(\w+)` \| (\w+) \|", line)
        if column and current:
            tables[current].append((column.group(1), column.group(2)))
    return tables


def actual_schema(path: Path) -> dict[str, list[tuple[str, str]]]:
    with sqlite3.connect(path) as db:
        names = [name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite_%'")]
        schema = {}
        for name in names:
            columns = db.execute(f"PRAGMA table_info({name})").fetchall()
            schema[name] = [(column[1], column[2] or _view_type(db, name, column[1]))
                            for column in columns]
        return schema


def _view_type(db: sqlite3.Connection, view: str, column: str) -> str:
    value = db.execute(f"SELECT typeof({column}) FROM {view} WHERE {column} IS NOT NULL LIMIT 1"
                       ).fetchone()
    return value[0].upper() if value else ""


def test_docs_store_md_matches_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    prepare_store(path)
    actual = actual_schema(path)
    documented = documented_schema()
    assert sorted(documented) == sorted(actual)
    for name, columns in actual.items():
        assert [c for c, _ in documented[name]] == [c for c, _ in columns], name
        if name not in VIEWS:
            assert documented[name] == columns, name


@pytest.mark.parametrize("view", VIEWS)
def test_view_columns_have_their_documented_types(make_pipeline, simulator, view: str) -> None:
    rows = [{"id": "a", "question": "fine"}]
    pipeline = make_pipeline(rows=rows, base_url=simulator.url)
    assert pipeline.run() == 0
    actual = actual_schema(pipeline.store)[view]
    documented = dict(documented_schema()[view])
    # `browse` gains a column for each field of the input but the id, after `item_id`
    fields = [column for column, _ in actual if column not in documented]
    assert fields == (["question"] if view == "browse" else [])
    for column, kind in actual:
        if kind and column in documented:
            assert documented[column] == kind, column
