"""Embeddings at 100,000 short texts, `inputs_per_request: 100`, against `flow simulate`.

1. a whole run: requests made (1,000 expected), vectors stored (100,000), the store's size
   on disk against the raw float32 size of the vectors (the target: under 4x), wall time
   and CPU seconds of the flow process;
2. the same run killed with SIGKILL once the server has answered about a third of the
   requests, then run again: the inputs the second run sends must be exactly those without
   a stored vector (the requests in flight at the kill were paid and lost, no more);
3. `flow export -o vectors.parquet`, timed, read back with pandas: shape (100,000, 1,536).

With `--store postgres` the same on a PostgreSQL store (`pgserver`, from the test extra):
`flow plan`, then `--workers` worker processes (`flow worker --processes N`) in place of
`flow run`; the kill takes every worker (their leases of 2 s then run out); the size is the
database's, less an empty one's; CPU seconds are flow's processes' and, apart, the server's.

    python bench/embeddings.py [--rows 100000] [--per-request 100] [--store postgres]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pgserver
import psycopg
import yaml
from simulator_process import simulator_process
from workers import new_database, server_cpu_s

DIMENSIONS = 1536


def write_pipeline(folder: Path, rows: int, per_request: int, base: str, store: str,
                   name: str) -> Path:
    """A pipeline embedding `rows` distinct short texts."""
    data = folder / "texts.jsonl"
    if not data.exists():
        with data.open("w") as out:
            for i in range(rows):
                out.write(json.dumps({"id": f"t{i:06d}",
                                      "text": f"Review {i}: the phone arrived on day {i % 31}"})
                          + "\n")
    config = {"store": store, "load": {"path": "texts.jsonl", "id": "id"},
              "call": {"endpoint": "embeddings", "model": "text-embedding-3-small",
                       "input": "{{ text }}", "inputs_per_request": per_request,
                       "base_url": base + "/v1", "api_key": "sk-bench", "concurrency": 16}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sim_stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/sim/stats", timeout=10) as reply:
        return dict(json.load(reply))


class Stores:
    """Where the bench's stores are: SQLite files in `folder`, or databases on a server."""

    def __init__(self, folder: Path, server_url: str | None, workers: int) -> None:
        self.folder = folder
        self.server_url = server_url
        self.workers = workers
        self.empty_bytes = 0
        if server_url is not None:
            with psycopg.connect(new_database(server_url)) as db:
                self.empty_bytes = int(db.execute(
                    "SELECT pg_database_size(current_database())").fetchone()[0])

    def new(self, name: str) -> str:
        """A new store's `store:` value."""
        return name if self.server_url is None else new_database(self.server_url)

    def count(self, store: str, sql: str) -> int:
        if self.server_url is None:
            with sqlite3.connect(self.folder / store) as db:
                return int(db.execute(sql).fetchone()[0])
        with psycopg.connect(store) as db:
            return int(db.execute(sql).fetchone()[0])  # type: ignore[index]

    def size(self, store: str) -> int:
        """The store's bytes on disk (a database's, less an empty one's)."""
        if self.server_url is None:
            return sum(p.stat().st_size for p in self.folder.glob(store + "*"))
        return self.count(store, "SELECT pg_database_size(current_database())") \
            - self.empty_bytes

    def start(self, pipeline: Path) -> list[subprocess.Popen[bytes]]:
        """Start the run (SQLite), or the workers (PostgreSQL: planned first)."""
        if self.server_url is None:
            return [subprocess.Popen([sys.executable, "-m", "flow", "run", str(pipeline)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        subprocess.run([sys.executable, "-m", "flow", "plan", str(pipeline)], check=True,
                       stderr=subprocess.DEVNULL)
        return [subprocess.Popen([sys.executable, "-m", "flow", "worker", str(pipeline),
                                  "--lease-s", "2"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(self.workers)]

    def run(self, pipeline: Path) -> tuple[float, float, int]:
        """The whole run: wall seconds, CPU seconds of flow's processes, exit code."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        if self.server_url is None:
            code = subprocess.run([sys.executable, "-m", "flow", "run", str(pipeline)],
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode
        else:
            subprocess.run([sys.executable, "-m", "flow", "plan", str(pipeline)], check=True,
                           stderr=subprocess.DEVNULL)
            code = subprocess.run([sys.executable, "-m", "flow", "worker", str(pipeline),
                                   "--processes", str(self.workers)],
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return time.monotonic() - started, cpu, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes on a PostgreSQL store")
    args = parser.parse_args()
    rows, per = args.rows, args.per_request
    raw = rows * DIMENSIONS * 4
    with tempfile.TemporaryDirectory() as tmp, simulator_process() as base:
        folder = Path(tmp)
        server = server_url = server_pid = None
        if args.store == "postgres":
            server = pgserver.get_server(folder / "pgdata", cleanup_mode="stop")
            server_url, server_pid = str(server.get_uri()), server.get_pid()
        stores = Stores(folder, server_url, args.workers)
        print(f"{rows:,} texts, inputs_per_request {per}, {DIMENSIONS} floats a vector, "
              f"{args.store} store" + (f", {args.workers} workers" if server else ""))

        store = stores.new("whole.db")
        pipeline = write_pipeline(folder, rows, per, base, store, "whole")
        server_before = server_cpu_s(server_pid) if server_pid else 0.0
        wall, cpu, code = stores.run(pipeline)
        server_cpu = (server_cpu_s(server_pid) - server_before) if server_pid else 0.0
        stats = sim_stats(base)
        vectors = stores.count(store, "SELECT COUNT(*) FROM vectors")
        size = stores.size(store)
        print(f"1. whole run: exit {code}, {wall:.1f} s wall, {cpu:.1f} CPU s"
              + (f" (and {server_cpu:.1f} CPU s of the server)" if server_pid else "")
              + f", {rows / wall:,.0f} vectors/s; {stats['requests']:,} requests "
              f"(expected {math.ceil(rows / per):,}), {stats['embedded_inputs']:,} inputs "
              f"sent, {vectors:,} vectors stored; store {size / 1e6:,.1f} MB for "
              f"{raw / 1e6:,.1f} MB of raw float32 = {size / raw:.2f}x (target < 4x)")

        store = stores.new("killed.db")
        pipeline = write_pipeline(folder, rows, per, base, store, "killed")
        sent_before = sim_stats(base)
        children = stores.start(pipeline)
        target = sent_before["requests"] + math.ceil(rows / per) // 3
        while sim_stats(base)["requests"] < target and children[0].poll() is None:
            time.sleep(0.05)
        for child in children:
            child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait()
        at_kill = sim_stats(base)
        stored = stores.count(store, "SELECT COUNT(*) FROM vectors")
        wall, cpu, code = stores.run(pipeline)
        after = sim_stats(base)
        resent = after["embedded_inputs"] - at_kill["embedded_inputs"]
        requests = after["requests"] - at_kill["requests"]
        lost = at_kill["embedded_inputs"] - sent_before["embedded_inputs"] - stored
        final = stores.count(store, "SELECT COUNT(*) FROM vectors")
        print(f"2. kill -9 after {at_kill['requests'] - sent_before['requests']:,} requests: "
              f"{stored:,} vectors stored, {lost:,} inputs paid in flight and lost; the "
              f"resume (exit {code}, {wall:.1f} s) sent {resent:,} inputs in {requests:,} "
              f"requests, {rows - stored:,} were missing "
              f"({'only what was missing' if resent == rows - stored else 'MORE'}); "
              f"{final:,} vectors at the end")

        out = folder / "vectors.parquet"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "flow", "export", str(pipeline), "-o", str(out)],
                       check=True, stderr=subprocess.DEVNULL)
        exported = time.monotonic() - started
        started = time.monotonic()
        frame = pd.read_parquet(out)
        matrix = np.stack(frame["embedding"].to_numpy())
        read = time.monotonic() - started
        print(f"3. export to Parquet: {exported:.1f} s, {os.path.getsize(out) / 1e6:,.1f} MB; "
              f"pandas read it back in {read:.1f} s: shape {matrix.shape}, {matrix.dtype}")
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
