"""The PostgreSQL store behaves as the SQLite store does, through the same commands.

Each test runs against both stores where both apply: `flow run`, resume, an edited post
step, failures, `show`, `export` and `status` read the same either way.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from conftest import Pipeline, questions

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def on(kind: str, pipeline: Pipeline, request: pytest.FixtureRequest) -> Pipeline:
    if kind == "postgres":
        pipeline.config["store"] = request.getfixturevalue("postgres_url")
    return pipeline


def export(pipeline: Pipeline, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    rows = pipeline.export(capsys)
    return [{key: value for key, value in row.items()} for row in rows]


def test_a_run_resumes_and_reads_alike_on_either_store(
        make_pipeline: Any, simulator: Any, store_kind: str, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = questions(30) + [{"id": "same", "question": "What is 1 plus 1?"}]
    pipeline = on(store_kind, make_pipeline(rows, simulator.url), request)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30  # the last row's request is the second row's
    first = export(pipeline, capsys)
    assert [row["id"] for row in first] == [row["id"] for row in rows]
    assert all(row["status"] == "done" for row in first)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30  # a second run pays nothing
    pipeline.config["post"] = ["strip", "lower"]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 30  # an edited post step re-posts stored replies
    again = export(pipeline, capsys)
    assert [row["output"] for row in again] == [row["output"].lower() for row in first]
    capsys.readouterr()
    assert pipeline.cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["items"], status["done"], status["replies_paid"]) == (31, 31, 30)
    assert pipeline.cli("show", "q00003") == 0
    shown = capsys.readouterr().out
    assert "What is 3 plus 3?" in shown


def test_failures_are_recorded_per_item_on_either_store(
        make_pipeline: Any, simulator: Any, store_kind: str, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = questions(10) + [{"id": "bad", "question": "[sim:status=400] refuse this"}]
    pipeline = on(store_kind, make_pipeline(rows, simulator.url), request)
    assert pipeline.run() == 1
    capsys.readouterr()
    assert pipeline.cli("failures", "--json") == 0
    failures = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in failures] == ["bad"]
    assert failures[0]["error_class"] == "BadRequestError"


def test_paid_replies_cannot_be_changed_on_postgres(
        make_pipeline: Any, simulator: Any, postgres_url: str) -> None:
    pipeline = make_pipeline(questions(3), simulator.url)
    pipeline.config["store"] = postgres_url
    assert pipeline.run() == 0
    with psycopg.connect(postgres_url, autocommit=True) as db:
        for sql in ("UPDATE responses SET cost_usd = 0", "DELETE FROM responses",
                    "TRUNCATE responses CASCADE"):
            with pytest.raises(psycopg.Error, match="never changed"):
                db.execute(sql)


def test_a_worker_with_another_pipeline_refuses_to_start(
        make_pipeline: Any, simulator: Any, postgres_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = make_pipeline(questions(3), simulator.url)
    pipeline.config["store"] = postgres_url
    assert pipeline.cli("plan") == 0
    pipeline.config["post"] = ["strip", "lower"]
    capsys.readouterr()
    assert pipeline.cli("worker") == 2
    err = capsys.readouterr().err
    assert "differs from the one the store was planned with" in err and "post steps" in err
    assert simulator.stats.requests == 0


def test_a_sqlite_only_command_names_the_store_kind(
        make_pipeline: Any, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = make_pipeline(questions(3))
    assert pipeline.cli("plan") == 2
    assert "need a PostgreSQL store" in capsys.readouterr().err
    pipeline.config["store"] = postgres_url.replace("host=", "host=/nonexistent")
    assert pipeline.cli("status") == 2
    err = capsys.readouterr().err
    assert "cannot read the store" in err and "password" not in err
