"""Reading rows: streamed, numbered by line, bad rows carry their reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from flow.config import LoadConfig
from flow.errors import SourceError
from flow.load import count_rows, read_rows


def rows_of(path: Path, **options: object) -> list[tuple[int, str, object, str | None]]:
    config = LoadConfig(path=path, **options)  # type: ignore[arg-type]
    return [(r.number, r.item_id, r.fields, str(r.error) if r.error else None)
            for r in read_rows(config)]


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n{"a": 3}')
    assert rows_of(path) == [(1, "1", {"a": 1}, None), (3, "3", {"a": 2}, None),
                             (4, "4", {"a": 3}, None)]


def test_jsonl_bad_lines_fail_alone(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{bad\n"text"\n\xff\xfe\n{"a": 2}\n')
    rows = rows_of(path)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1][3] is not None and "in.jsonl row 2: invalid JSON" in rows[1][3]
    assert rows[2][3] is not None and "expected a JSON object, got str" in rows[2][3]
    assert rows[3][3] is not None and "row 4: not valid utf-8" in rows[3][3]
    assert rows[4][2] == {"a": 2}


def test_jsonl_rows_read_as_the_full_decoder_reads_them(tmp_path: Path) -> None:
    # the scanner reads a bare row; whitespace around it, text after it, a constant JSON
    # cannot hold and a value that is not JSON go to the full decoder, which says what
    path = tmp_path / "in.jsonl"
    path.write_bytes(b' {"a": 1}\n{"a": 2}  \t\n{"a": 3} x\n{"a": NaN}\n{"a": 1e999}\n'
                     b'nul\n[]\n{"a": [{"b": null}]}\n')
    rows = rows_of(path)
    assert [r[2] for r in rows[:2]] == [{"a": 1}, {"a": 2}]
    assert rows[2][3] == "in.jsonl row 3: invalid JSON at column 10: Extra data"
    assert rows[3][3] is not None and "row 4: NaN is not a number JSON can hold" in rows[3][3]
    assert rows[4][3] is not None and "row 5: 1e999 is not a number JSON can hold" in rows[4][3]
    assert rows[5][3] == "in.jsonl row 6: invalid JSON at column 1: Expecting value"
    assert rows[6][3] == "in.jsonl row 7: expected a JSON object, got list"
    assert rows[7][2] == {"a": [{"b": None}]}


def test_id_field_names_items_and_missing_id_fails_the_row(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"key": 7}\n{"other": 1}\n{"key": [1]}\n')
    rows = rows_of(path, id="key")
    assert rows[0][1] == "7"
    assert rows[1][3] is not None and "has no id field 'key'" in rows[1][3]
    assert rows[2][3] is not None and "non-scalar id field" in rows[2][3]


def test_csv_uses_the_header_and_keeps_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('\ufeffid,question\nA,"two\nlines"\nB,plain\nC\n', encoding="utf-8")
    rows = rows_of(path, id="id")
    assert rows[0] == (2, "A", {"id": "A", "question": "two\nlines"}, None)
    assert rows[1] == (4, "B", {"id": "B", "question": "plain"}, None)
    assert rows[2][3] is not None and "1 fields, the header has 2" in rows[2][3]


def test_csv_bad_bytes_fail_their_row(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,q\n1,ok\n2,caf\xe9\n3,fine\n")
    rows = rows_of(path, id="id")
    assert [r[3] is None for r in rows] == [True, False, True]


def test_txt_gives_one_text_field_per_line(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("first\n\nsecond line\n")
    assert rows_of(path) == [(1, "1", {"text": "first"}, None),
                             (3, "3", {"text": "second line"}, None)]


def test_huge_rows_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": "' + "x" * 5000 + '"}\n{"a": 1}\n')
    rows = rows_of(path, max_row_bytes=1000)
    assert rows[0][3] is not None and "longer than 1000 bytes" in rows[0][3]
    assert rows[1] == (2, "2", {"a": 1}, None)


def test_missing_input_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="input file not found"):
        rows_of(tmp_path / "none.jsonl")


def test_count_rows_counts_lines_fast(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"i": {i}}}\n' for i in range(1234)))
    assert count_rows(LoadConfig(path=path)) == 1234
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("a\n1\n2")
    assert count_rows(LoadConfig(path=csv_path)) == 2


def test_rows_are_streamed_not_read_ahead(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    rows = read_rows(LoadConfig(path=path))
    assert next(rows).fields == {"a": 1}
    with path.open("a") as handle:
        handle.write('{"a": 3}\n')
    assert [r.fields for r in rows] == [{"a": 2}, {"a": 3}]


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow.errors import RowError


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), fmt=st.sampled_from(["jsonl", "csv", "txt"]),
       id_field=st.sampled_from([None, "id"]))
def test_arbitrary_bytes_give_rows_or_row_errors_only(data: bytes, fmt: str, id_field: str | None,
                                                      tmp_path: Path) -> None:
    path = tmp_path / f"in.{fmt}"
    path.write_bytes(data)
    config = LoadConfig(path=path, id=id_field, max_row_bytes=200)
    try:
        rows = list(read_rows(config))
    except SourceError as e:
        assert fmt == "csv" and "header" in str(e)
        return
    for row in rows:
        assert (row.fields is None) == (row.error is not None)
        assert row.error is None or isinstance(row.error, RowError)
    assert count_rows(config) >= 0


def test_a_bad_row_never_takes_a_numeric_id_of_a_real_row(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 3, "q": "a"}\n{"id": 4, "q": "b"}\n{bad\n{"id": 3.5}\n')
    ids = [item_id for _, item_id, _, _ in rows_of(path, id="id")]
    assert ids == ["3", "4", "#row3", "3.5"]


def test_a_stray_csv_quote_fails_its_row_and_never_swallows_the_rest(tmp_path: Path) -> None:
    lines = ["id,review,label"] + [f'{i},"review {i}, fine",pos' for i in range(1, 101)]
    lines[3] = '3,"a stray quote,pos'  # never closed
    lines[60] = '60,he said "no,neg'  # a quote inside a bare field is kept as it is
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    rows = rows_of(path, id="id")
    assert len(rows) == 100
    bad = [row for row in rows if row[3] is not None]
    assert [row[0] for row in bad] == [4]
    assert "in.csv row 4: a quoted field opens here and does not end a field" in str(bad[0][3])
    assert rows[3] == (5, "4", {"id": "4", "review": "review 4, fine", "label": "pos"}, None)
    assert rows[59][2] == {"id": "60", "review": 'he said "no', "label": "neg"}


def test_a_quoted_csv_field_is_bounded_in_lines_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    # closed at last, but 8 lines later than load.max_row_lines allows
    path.write_text('id,text\n1,"opens\n' + "2,x\n" * 8 + '9,closes"\n10,fine\n')
    rows = rows_of(path, id="id", max_row_lines=5)
    assert "runs over 5 lines (load.max_row_lines)" in str(rows[0][3])
    assert [row[1] for row in rows[1:]] == ["2"] * 8 + ["9", "10"]
    assert rows[-1][1:3] == ("10", {"id": "10", "text": "fine"})
    path.write_text('id,text\n1,"' + "y" * 50 + "\n" + "z" * 60 + '"\n2,ok\n')
    rows = rows_of(path, id="id", max_row_bytes=100)
    assert "runs over 100 bytes (load.max_row_bytes)" in str(rows[0][3])


def test_load_types_convert_csv_text_and_refuse_a_value_not_of_its_type(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,stars,score,ok,tags\nA,1,0.5,yes,"[1, 2]"\nB,,2,no,{}\nC,many,1,t,[]\n')
    types = {"stars": "int", "score": "float", "ok": "bool", "tags": "json"}
    rows = rows_of(path, id="id", types=types)
    assert rows[0][2] == {"id": "A", "stars": 1, "score": 0.5, "ok": True, "tags": [1, 2]}
    assert rows[1][2] == {"id": "B", "stars": None, "score": 2.0, "ok": False, "tags": {}}
    assert rows[2][3] == "in.csv row 4: stars: 'many' is not an int (load.types)"
