"""Shared fixtures: a simulator on loopback, pipelines in a temporary folder, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from flow.cli import main
from flow.simulator import SimulatorConfig, SimulatorThread

API_KEY = "sk-test-0123456789abcdef"
ENDS_WITHIN_S = 60  # in-process work (workers, a store's scenario) ends within this
T = TypeVar("T")


def run_within(work: Coroutine[Any, Any, T], within_s: float = ENDS_WITHIN_S) -> T:
    """`asyncio.run(work)`; a failure, not a wait for good, when it has not ended within
    `within_s` (a worker that never decides it is done, a commit that never returns)."""
    async def bounded() -> T:
        deadline = asyncio.timeout(within_s)
        try:
            async with deadline:
                return await work
        except TimeoutError:
            if not deadline.expired():
                raise  # the work's own
            raise AssertionError(f"not ended within {within_s:g} s") from None

    return asyncio.run(bounded())


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    """A simulator with no latency and no faults; tests change `.config` as they need."""
    with SimulatorThread(SimulatorConfig(seed=7)) as server:
        yield server


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as JSONL."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def questions(count: int) -> list[dict[str, Any]]:
    """`count` distinct rows with an id and a question."""
    return [{"id": f"q{i:05d}", "question": f"What is {i} plus {i}?"} for i in range(count)]


@dataclass
class Pipeline:
    """A pipeline file in a temporary folder, and helpers to run flow on it."""

    folder: Path
    config: dict[str, Any]

    @property
    def file(self) -> Path:
        return self.folder / "pipeline.yaml"

    @property
    def store(self) -> Path:
        return self.folder / self.config["store"]

    def write(self) -> Path:
        self.file.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        return self.file

    def run(self, *args: str) -> int:
        """`flow run` in this process; returns the exit code."""
        self.write()
        return main(["run", str(self.file), *args])

    def cli(self, command: str, *args: str) -> int:
        self.write()
        return main([command, str(self.file), *args])

    def export(self, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
        capsys.readouterr()
        assert self.cli("export") == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.store) as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture
def make_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Build a pipeline over `rows` against `base_url`; keys of `call`/`load` can be overridden."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    def make(rows: list[dict[str, Any]] | None = None, base_url: str | None = None,
             **overrides: Any) -> Pipeline:
        write_rows(tmp_path / "rows.jsonl", questions(20) if rows is None else rows)
        call: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "{{ question }}"}],
            "params": {"temperature": 0},
            "concurrency": 8,
            "timeout_s": 5,
            # retries wait nothing in tests: waits come from config, never slept through
            "retry": {"max_tries": 6, "max_time_s": 60, "first_wait_s": 0, "max_wait_s": 0},
        }
        if base_url:
            call["base_url"] = base_url
        call_overrides = dict(overrides.pop("call", {}))
        call["retry"] = {**call["retry"], **call_overrides.pop("retry", {})}
        call.update(call_overrides)
        config: dict[str, Any] = {"store": "flow.db",
                                  "load": {"path": "rows.jsonl", "id": "id",
                                           **overrides.pop("load", {})},
                                  "call": call, "post": overrides.pop("post", ["strip"])}
        config.update(overrides)
        return Pipeline(tmp_path, config)

    return make


def flow_process(pipeline: Pipeline, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    """`python -m flow run` on `pipeline` in a child process."""
    pipeline.write()
    return subprocess.Popen(
        [sys.executable, "-m", "flow", "run", str(pipeline.file), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OPENAI_API_KEY": API_KEY, **(env or {})})


def interrupt(child: subprocess.Popen[str], within_s: float = 30) -> int:
    """Ctrl-C a flow child process; its exit code, once it has ended within `within_s`."""
    child.send_signal(signal.SIGINT)
    try:
        child.communicate(timeout=within_s)
    finally:
        child.kill()
    return child.returncode


def wait_for_requests(server: SimulatorThread, count: int, within_s: float = 30) -> None:
    """Wait until the simulator has received `count` requests."""
    deadline = time.monotonic() + within_s
    while server.stats.requests < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats.requests >= count


def wait_for_line(child: subprocess.Popen[str], text: str, within_s: float = 30) -> None:
    """Read the child's stderr until a line holding `text`; a failure, not a wait for good,
    when its stderr ends first or no such line comes within `within_s`."""
    stream = child.stderr
    assert stream is not None
    found = threading.Event()

    def read() -> None:
        for line in stream:
            if text in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(within_s)
    assert found.is_set(), f"the child printed no line with {text!r} within {within_s:g} s"


def kill_mid_run(pipeline: Pipeline, server: SimulatorThread, after_requests: int) -> None:
    """Run flow in a child process and SIGKILL it once the server has `after_requests`."""
    child = flow_process(pipeline)
    wait_for_requests(server, after_requests)
    child.send_signal(signal.SIGKILL)
    child.wait(10)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server for this test process (`pgserver`, a test dependency)."""
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield str(server.get_uri())
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """The URL of a new, empty database on the test server."""
    import uuid

    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return postgres_server.replace("/postgres?", f"/{name}?")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test API key in the environment, and no base URL from it."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
