"""`flow browse`: Datasette on the store, with its metadata; checked in a real browser."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import flow.browse
from flow.browse import browse_columns, browse_url, datasette_metadata
from flow.errors import StoreError

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
HAS_DATASETTE = importlib.util.find_spec("datasette") is not None
ROWS = [{"id": "b", "question": "Two?", "<i>tag</i>": "x"}, {"id": "a", "question": "One?"}]


def test_browse_without_datasette_exits_2_and_names_the_extra(
        make_pipeline, simulator, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url)
    assert pipeline.run() == 0
    monkeypatch.setattr(flow.browse, "has_datasette", lambda: False)
    capsys.readouterr()
    assert pipeline.cli("browse") == 2
    assert "pip install 'flow[browse]'" in capsys.readouterr().err


def test_browse_before_any_run_says_to_run_the_pipeline_first(
        make_pipeline, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(flow.browse, "has_datasette", lambda: True)
    assert make_pipeline(rows=ROWS).cli("browse") == 2
    assert "no store yet; run the pipeline first" in capsys.readouterr().err


def test_a_store_of_an_older_flow_is_upgraded_by_a_run_first(tmp_path: Path) -> None:
    store = tmp_path / "flow.db"
    with sqlite3.connect(store) as db:
        db.executescript((ROOT / "tests" / "data" / "store_release_0_1_0.sql").read_text())
    with pytest.raises(StoreError, match="older flow; `flow run` the pipeline once"):
        browse_columns(store)


def test_metadata_labels_describes_and_facets_the_store(make_pipeline, simulator) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url)
    assert pipeline.run() == 0
    columns = browse_columns(pipeline.store)
    metadata = datasette_metadata(pipeline.store, pipeline.file, columns)
    tables = metadata["databases"]["flow"]["tables"]
    with sqlite3.connect(pipeline.store) as db:
        names = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    assert set(tables) == names
    assert all(table["title"] and table["description"] for table in tables.values())
    for view in ("browse", "results"):
        assert tables[view]["facets"] == ["status", "error_class"]
        with sqlite3.connect(pipeline.store) as db:
            view_columns = [row[1] for row in db.execute(f"PRAGMA table_info({view})")]
        described = tables[view]["description_html"]
        assert all(f"<dt>{column}</dt>" in described for column in view_columns
                   if column != "<i>tag</i>"), view
    # input fields come from the user's file: described, and never taken for HTML
    assert "question" in columns and "<i>tag</i>" in columns
    assert "<dt>&lt;i&gt;tag&lt;/i&gt;</dt><dd>an input field</dd>" in \
        tables["browse"]["description_html"]
    assert json.loads(json.dumps(metadata)) == metadata


@pytest.mark.skipif(not HAS_DATASETTE, reason="Datasette (flow[browse]) is not installed")
def test_browse_url_names_the_database_as_datasette_does() -> None:
    from datasette.utils import tilde_encode

    for stem in ("flow", "my store", "résultats.v2", "a-b_c"):
        name = tilde_encode(stem).replace("~20", "+")
        assert browse_url(Path(f"data/{stem}.db"), "127.0.0.1", 8001, ["row", "input"]) == \
            f"http://127.0.0.1:8001/{name}/browse"


def test_browse_url_hides_the_input_json_when_its_fields_have_columns() -> None:
    url = browse_url(Path("flow.db"), "localhost", 9000, ["row", "item_id", "q", "input"])
    assert url == "http://localhost:9000/flow/browse?_nocol=input"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get_json(url: str, within_s: float = 30) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.load(answer)
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.skipif(not HAS_DATASETTE, reason="Datasette (flow[browse]) is not installed")
def test_flow_browse_serves_the_browse_view_with_its_facets(make_pipeline, simulator) -> None:
    pipeline = make_pipeline(rows=ROWS, base_url=simulator.url)
    assert pipeline.run() == 0
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flow", "browse", str(pipeline.file), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        page = get_json(f"http://127.0.0.1:{port}/flow/browse.json?_shape=objects")
        facets = get_json(f"http://127.0.0.1:{port}/flow/browse.json")["facet_results"]
        meta = get_json(f"http://127.0.0.1:{port}/-/metadata.json")
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=20)
    assert [row["item_id"] for row in page["rows"]] == ["b", "a"]
    assert [row["question"] for row in page["rows"]] == ["Two?", "One?"]
    assert all(row["status"] == "done" and not row["output"].startswith('"')
               for row in page["rows"])
    assert set(facets) == {"status", "error_class"}
    assert meta["databases"]["flow"]["tables"]["browse"]["title"] == "Results, for reading"
    assert f"http://127.0.0.1:{port}/flow/browse?_nocol=input" in err
    assert server.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATASETTE, reason="Datasette (flow[browse]) is not installed")
@pytest.mark.skipif(not any(shutil.which(name) for name in BROWSERS),
                    reason="no headless Chromium (apt-get install chromium)")
def test_a_real_browser_shows_rows_in_input_order_fields_labels_and_costs(
        tmp_path: Path) -> None:
    screenshot = tmp_path / "browse.png"
    check = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "browse_check.py"), "--screenshot",
         str(screenshot)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "ok: 8 rows in input order" in check.stdout
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
