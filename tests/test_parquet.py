"""Parquet in (streamed by row group) and out (typed columns), end to end through the CLI."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flow.simulator import SimulatorThread


def _write_input(path: Path, count: int, row_group_size: int = 7) -> None:
    table = pa.table({
        "id": [f"p{i:03d}" for i in range(count)],
        "question": [f"What is {i} times two?" for i in range(count)],
        "n": pa.array(range(count), type=pa.int32()),
        "score": [i / 4 for i in range(count)],
        "day": [datetime.date(2024, 1, 1 + i % 28) for i in range(count)],
        "tags": [["a", str(i)] for i in range(count)],
    })
    pq.write_table(table, path, row_group_size=row_group_size)


def _parquet_pipeline(make_pipeline: Any, simulator: SimulatorThread, count: int) -> Any:
    pipeline = make_pipeline(base_url=simulator.url, load={"path": "rows.parquet"})
    _write_input(pipeline.folder / "rows.parquet", count)
    return pipeline


def test_parquet_input_runs_every_row_and_exports_typed_columns(
        make_pipeline: Any, simulator: SimulatorThread) -> None:
    pipeline = _parquet_pipeline(make_pipeline, simulator, 30)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30
    out = pipeline.folder / "out" / "results.parquet"
    assert pipeline.cli("export", "-o", str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 30
    assert table.column_names == ["id", "question", "n", "score", "day", "tags", "status",
                                  "output", "truncated", "error_class", "error",
                                  "prompt_tokens", "completion_tokens", "cost_usd"]
    types = {field.name: str(field.type) for field in table.schema}
    assert types["n"] == "int64" and types["score"] == "double" and types["day"] == "string"
    assert types["truncated"] == "bool" and types["prompt_tokens"] == "int64"
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"p{i:03d}" for i in range(30)]
    assert rows[5]["n"] == 5 and rows[5]["score"] == 1.25 and rows[5]["day"] == "2024-01-06"
    assert rows[5]["tags"] == '["a","5"]'
    assert all(r["status"] == "done" and "What is" in r["output"] for r in rows)
    assert sum(r["cost_usd"] for r in rows) > 0 and all(r["prompt_tokens"] > 0 for r in rows)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]

    assert pipeline.cli("export", "-o", str(out), "--no-input", "--only", "done") == 0
    assert pq.read_table(out).column_names[:3] == ["id", "status", "output"]


def test_parquet_resume_calls_only_rows_not_done(make_pipeline: Any,
                                                 simulator: SimulatorThread) -> None:
    pipeline = _parquet_pipeline(make_pipeline, simulator, 20)
    assert pipeline.run("--limit", "8") == 0
    assert simulator.stats.requests == 8
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20


def test_parquet_row_json_cannot_hold_fails_alone(make_pipeline: Any,
                                                  simulator: SimulatorThread) -> None:
    pipeline = make_pipeline(base_url=simulator.url, load={"path": "rows.parquet"})
    pq.write_table(pa.table({"id": ["a", "b", "c"], "question": ["x", "y", "z"],
                             "weight": [1.0, float("nan"), 2.0]}),
                   pipeline.folder / "rows.parquet")
    assert pipeline.run() == 1
    (status, error), = pipeline.query("SELECT status, error FROM results WHERE row = 2")
    assert status == "failed" and "rows.parquet row 2" in error and "nan" in error
    assert simulator.stats.requests == 2


def test_export_csv_by_suffix_and_parquet_needs_a_file(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    import csv
    pipeline = _parquet_pipeline(make_pipeline, simulator, 5)
    assert pipeline.run() == 0
    out = pipeline.folder / "results.csv"
    assert pipeline.cli("export", "-o", str(out), "--fields", "question,n") == 0
    with out.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["id"], r["n"], r["status"]) for r in table][:2] == [("p000", "0", "done"),
                                                                   ("p001", "1", "done")]
    capsys.readouterr()
    assert pipeline.cli("export", "--format", "parquet") == 2
    assert "name it with -o" in capsys.readouterr().err


def test_not_a_parquet_file_exits_2_naming_it(make_pipeline: Any, simulator: SimulatorThread,
                                               capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url, load={"path": "rows.parquet"})
    (pipeline.folder / "rows.parquet").write_text("id,question\n1,x\n")
    assert pipeline.run() == 2
    err = capsys.readouterr().err
    assert "rows.parquet" in err and "not a Parquet file" in err
    assert simulator.stats.requests == 0


def test_parquet_without_pyarrow_names_the_extra(make_pipeline: Any, simulator: SimulatorThread,
                                                 capsys: Any, monkeypatch: Any) -> None:
    pipeline = _parquet_pipeline(make_pipeline, simulator, 3)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert pipeline.run() == 2
    assert "pip install 'flow[parquet]'" in capsys.readouterr().err
    assert simulator.stats.requests == 0
