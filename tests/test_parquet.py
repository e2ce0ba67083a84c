"""Parquet in (streamed by row group) and out (typed columns), end to end through the CLI."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


def test_parquet_without_its_reader_names_the_extra(make_pipeline: Any, simulator: SimulatorThread,
                                                    capsys: Any, monkeypatch: Any) -> None:
    pipeline = _parquet_pipeline(make_pipeline, simulator, 3)
    monkeypatch.setitem(sys.modules, "arro3", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "arro3.io", None)
    assert pipeline.run() == 2
    assert "pip install 'flow[parquet]'" in capsys.readouterr().err
    assert simulator.stats.requests == 0


def test_every_arrow_type_reads_as_json_holds_it_the_way_pyarrow_reads_it(tmp_path: Path) -> None:
    # the run's reader (arro3-io) gives each row what pyarrow's own reading gives, as JSON
    import decimal

    from flow.config import LoadConfig
    from flow.load.parquet_rows import _json_value, parquet_rows

    utc = datetime.UTC
    table = pa.table({
        "i": pa.array([1, None, -3], pa.int64()), "u8": pa.array([1, 2, 255], pa.uint8()),
        "f": pa.array([1.5, None, -0.25], pa.float32()), "s": ["a", None, "é"],
        "ls": pa.array(["big", None, ""], pa.large_string()), "b": [True, False, None],
        "bin": pa.array([b"xy", None, b""], pa.binary()),
        "d": pa.array([datetime.date(2020, 1, 2), None, datetime.date(1970, 1, 1)]),
        "ts": pa.array([datetime.datetime(2020, 1, 2, 3, 4, 5), None,
                        datetime.datetime(2000, 1, 1)], pa.timestamp("us")),
        "tsz": pa.array([datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=utc), None,
                         datetime.datetime(2000, 1, 1, tzinfo=utc)], pa.timestamp("ms", "UTC")),
        "tm": pa.array([datetime.time(1, 2, 3), None, datetime.time(0)], pa.time64("us")),
        "dur": pa.array([datetime.timedelta(seconds=3), None, datetime.timedelta(0)],
                        pa.duration("ms")),
        "dec": pa.array([decimal.Decimal("1.25"), None, decimal.Decimal("-7.00")],
                        pa.decimal128(10, 2)),
        "l": [[1, 2], [], None], "st": [{"a": 1, "b": "x"}, None, {"a": None, "b": ""}],
        "m": pa.array([[("k", 1)], [], None], pa.map_(pa.string(), pa.int64())),
        "dict": pa.array(["x", "y", "x"]).dictionary_encode(),
    })
    path = tmp_path / "types.parquet"
    pq.write_table(table, path, row_group_size=2)
    rows = list(parquet_rows(LoadConfig(path=path)))
    expected = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
    assert [(number, fields, error) for number, fields, error, _ in rows] == [
        (n, fields, None) for n, fields in enumerate(expected, 1)]


def test_a_parquet_file_cut_short_or_damaged_is_a_clear_error(tmp_path: Path) -> None:
    from flow.config import LoadConfig
    from flow.errors import SourceError
    from flow.load.parquet_rows import count_parquet_rows, parquet_rows

    whole = tmp_path / "whole.parquet"
    _write_input(whole, 5000, row_group_size=1000)
    data = whole.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[:len(data) // 2])
    for read in (count_parquet_rows, lambda config: list(parquet_rows(config))):
        with pytest.raises(SourceError, match="cut.parquet: not a Parquet file"):
            read(LoadConfig(path=cut))
    # a page of the third row group overwritten: the rows read before it kept, then an error
    # that says how far the file was read
    damaged = tmp_path / "damaged.parquet"
    start = pq.ParquetFile(whole).metadata.row_group(2).column(1).data_page_offset
    damaged.write_bytes(data[:start] + bytes(64) + data[start + 64:])
    read: list[Any] = []
    with pytest.raises(SourceError, match=r"damaged.parquet: cannot read input after row") as e:
        read.extend(parquet_rows(LoadConfig(path=damaged)))
    assert 0 < len(read) <= 2000
    assert f"after row {len(read):,}:" in str(e.value)
