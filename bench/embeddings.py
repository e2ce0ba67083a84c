"""Embeddings at 100,000 short texts, `inputs_per_request: 100`, against `flow simulate`.

1. a whole run: requests made (1,000 expected), vectors stored (100,000), the store's size
   on disk against the raw float32 size of the vectors (the target: under 4x), wall time
   and CPU seconds of the flow process;
2. the same run killed with SIGKILL once the server has answered about a third of the
   requests, then run again: the inputs the second run sends must be exactly those without
   a stored vector (the requests in flight at the kill were paid and lost, no more);
3. `flow export -o vectors.parquet`, timed, read back with pandas: shape (100,000, 1,536).

    python bench/embeddings.py [--rows 100000] [--per-request 100]
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
import yaml
from simulator_process import simulator_process

DIMENSIONS = 1536


def write_pipeline(folder: Path, rows: int, per_request: int, base: str, store: str) -> Path:
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
    path = folder / f"{store}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sim_stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/sim/stats", timeout=10) as reply:
        return dict(json.load(reply))


def run(pipeline: Path) -> tuple[float, float, int]:
    """`flow run`: wall seconds, CPU seconds of the child, exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    code = subprocess.run([sys.executable, "-m", "flow", "run", str(pipeline)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.monotonic() - started, cpu, code


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.parent.glob(store.name + "*"))


def count(store: Path, sql: str) -> int:
    with sqlite3.connect(store) as db:
        return int(db.execute(sql).fetchone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-request", type=int, default=100)
    args = parser.parse_args()
    rows, per = args.rows, args.per_request
    raw = rows * DIMENSIONS * 4
    with tempfile.TemporaryDirectory() as tmp, simulator_process() as base:
        folder = Path(tmp)
        print(f"{rows:,} texts, inputs_per_request {per}, {DIMENSIONS} floats a vector")

        pipeline = write_pipeline(folder, rows, per, base, "whole.db")
        wall, cpu, code = run(pipeline)
        stats = sim_stats(base)
        store = folder / "whole.db"
        vectors = count(store, "SELECT COUNT(*) FROM vectors")
        size = store_bytes(store)
        print(f"1. whole run: exit {code}, {wall:.1f} s wall, {cpu:.1f} CPU s, "
              f"{rows / wall:,.0f} vectors/s; {stats['requests']:,} requests "
              f"(expected {math.ceil(rows / per):,}), {stats['embedded_inputs']:,} inputs "
              f"sent, {vectors:,} vectors stored; store {size / 1e6:,.1f} MB for "
              f"{raw / 1e6:,.1f} MB of raw float32 = {size / raw:.2f}x (target < 4x)")

        pipeline = write_pipeline(folder, rows, per, base, "killed.db")
        store = folder / "killed.db"
        sent_before = sim_stats(base)
        child = subprocess.Popen([sys.executable, "-m", "flow", "run", str(pipeline)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = sent_before["requests"] + math.ceil(rows / per) // 3
        while sim_stats(base)["requests"] < target and child.poll() is None:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        at_kill = sim_stats(base)
        stored = count(store, "SELECT COUNT(*) FROM vectors")
        wall, cpu, code = run(pipeline)
        after = sim_stats(base)
        resent = after["embedded_inputs"] - at_kill["embedded_inputs"]
        requests = after["requests"] - at_kill["requests"]
        lost = at_kill["embedded_inputs"] - sent_before["embedded_inputs"] - stored
        final = count(store, "SELECT COUNT(*) FROM vectors")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
