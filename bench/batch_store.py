"""The Batch API executor on either store: a `flow run` of N items through batches, on SQLite
and on PostgreSQL, in interleaved pairs.

Starts a PostgreSQL server (`pgserver`, from the test extra) and `flow simulate` as its own
process (a batch runs its lines in `--batch-s` seconds), and prints, for each store, the
median wall seconds of the run and the CPU seconds of this process (the run: planning,
upload, polling, collection) and of the database server:

    python bench/batch_store.py                      # 20,000 items, batches of 5,000, 3 pairs
    python bench/batch_store.py --items 50000 --per-batch 50000 --pairs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pgserver
import psycopg
import yaml
from simulator_process import simulator_process
from workers import server_cpu_s

from flow.cli import main as flow_main

API_KEY = "sk-bench-0123456789abcdef"


def new_database(server_url: str) -> str:
    name = f"b{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return server_url.replace("/postgres?", f"/{name}?")


def pipeline(folder: Path, store: str, base_url: str, per_batch: int) -> Path:
    config: dict[str, Any] = {
        "store": store, "load": {"path": "rows.jsonl", "id": "id"},
        "call": {"model": "gpt-4o-mini", "base_url": base_url,
                 "messages": [{"role": "user", "content": "{{ question }}"}],
                 "executor": "batch",
                 "batch": {"max_requests_per_batch": per_batch, "first_poll_s": 0.05,
                           "max_poll_s": 0.2, "gather_s": 0.05, "create_grace_s": 0}},
        "post": ["strip"]}
    path = folder / f"pipeline-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_once(path: Path, server_pid: int) -> tuple[float, float, float]:
    """(wall s, this process's CPU s, the server's CPU s) of one `flow run`."""
    server_before = server_cpu_s(server_pid)
    cpu, wall = time.process_time(), time.perf_counter()
    code = flow_main(["run", str(path)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert code == 0, f"flow run exited {code}"
    return wall, cpu, server_cpu_s(server_pid) - server_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--per-batch", type=int, default=5_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--batch-s", type=float, default=0.5)
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = API_KEY
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as pgdata:
        work = Path(folder)
        with (work / "rows.jsonl").open("w", encoding="utf-8") as rows:
            for i in range(args.items):
                rows.write(json.dumps({"id": f"q{i:07d}", "question": f"What is {i} plus {i}?"})
                           + "\n")
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        url, pid = str(server.get_uri()), server.get_pid()
        assert pid is not None
        figures: dict[str, list[tuple[float, float, float]]] = {"sqlite": [], "postgres": []}
        with simulator_process("--batch-s", str(args.batch_s)) as base:
            for pair in range(args.pairs):
                for kind in ("sqlite", "postgres") if pair % 2 == 0 else ("postgres", "sqlite"):
                    store = (f"flow-{uuid.uuid4().hex[:6]}.db" if kind == "sqlite"
                             else new_database(url))
                    figures[kind].append(run_once(
                        pipeline(work, store, f"{base}/v1", args.per_batch), pid))
        server.cleanup()
    print(f"{args.items:,} items in batches of {args.per_batch:,}, {args.pairs} pairs "
          "(medians):", file=sys.stderr)
    for kind, runs in figures.items():
        wall, cpu, db = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{kind}: {wall:.1f} s wall, {args.items / wall:,.0f} items/s; CPU s: run "
              f"{cpu:.1f}, database server {db:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
