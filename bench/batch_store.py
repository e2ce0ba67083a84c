"""The Batch API executor on either store: a `flow run` of N items through batches, on SQLite
and on PostgreSQL, in interleaved pairs.

Starts a PostgreSQL server (`pgserver`, from the test extra) and `flow simulate` as its own
process (a batch runs its lines in `--batch-s` seconds), and prints, for each store, the
median wall seconds of the run and the CPU seconds of this process (the run: planning,
upload, polling, collection) and of the database server:

    python bench/batch_store.py                      # 20,000 items, batches of 5,000, 3 rounds
    python bench/batch_store.py --items 50000 --per-batch 50000 --rounds 1
    python bench/batch_store.py --in-flight 256 1    # PostgreSQL: lines committing at once
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
import yaml
from simulator_process import simulator_process
from workers import API_KEY, new_database, server_cpu_s

import flow.workers.batching
from flow.cli import main as flow_main


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="each store (and --in-flight value) once a round, in turns")
    parser.add_argument("--batch-s", type=float, default=0.5)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[256],
                        help="on PostgreSQL: a collection's lines committing at once (one "
                             "run each a round; 1 is one at a time)")
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
        kinds = ["sqlite", *(f"postgres, {n} in flight" for n in args.in_flight)]
        figures: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        with simulator_process("--batch-s", str(args.batch_s)) as base:
            for round_ in range(args.rounds):
                for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                    store = f"flow-{uuid.uuid4().hex[:6]}.db"
                    if kind != "sqlite":
                        store = new_database(url)
                        flow.workers.batching.IN_FLIGHT = int(kind.split()[1])
                    figures[kind].append(run_once(
                        pipeline(work, store, f"{base}/v1", args.per_batch), pid))
        server.cleanup()
    print(f"{args.items:,} items in batches of {args.per_batch:,}, {args.rounds} rounds "
          "(medians):", file=sys.stderr)
    for kind, runs in figures.items():
        wall, cpu, db = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{kind}: {wall:.1f} s wall, {args.items / wall:,.0f} items/s; CPU s: run "
              f"{cpu:.1f}, database server {db:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
