"""Do `status`, `failures` and `export` stay fast on a store of 1,000,000 results?

Builds a store with the real schema (1,000,000 items and calls, 2% failed across three error
classes, a few attempts each), then times each command as a user runs it: a fresh
`python -m flow ...` process, start-up included. Target: each under 3 s on 2 cores.

    python bench/store_queries.py [--items 1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from flow.store.sqlite import prepare_store

ERRORS = ("BadRequestError", "PostError", "APITimeoutError")


def build(folder: Path, items: int) -> Path:
    store = folder / "flow.db"
    prepare_store(store)
    rng = random.Random(1)
    now = "2026-11-25T00:00:00.000Z"
    with sqlite3.connect(store) as db:
        db.execute("INSERT INTO runs (pipeline, origin, endpoint, pid, started_at, finished_at, "
                   "state) VALUES ('p.yaml', 'sim', 'http://x', 1, ?, ?, 'finished')", (now, now))
        batch_items, batch_calls, batch_attempts = [], [], []
        for index in range(items):
            key = f"sha256:{index:064x}"
            failed = rng.random() < 0.02
            batch_items.append(("call", f"item-{index:07d}", index + 1,
                                json.dumps({"id": index, "question": f"What is {index}?"}),
                                key, "sim", None, None, now))
            request = json.dumps({"model": "gpt-4o-mini", "messages": [
                {"role": "user", "content": f"What is {index}?"}]})
            response = json.dumps({"choices": [{"message": {"content": f"It is {index}."},
                                                "finish_reason": "stop"}]})
            batch_calls.append((key, "sim", "gpt-4o-mini", request, response,
                                None if failed else json.dumps({"answer": index}), "post",
                                "failed" if failed else "done",
                                rng.choice(ERRORS) if failed else None,
                                "simulated failure" if failed else None, 1, 40, 12, 0,
                                0.0000132, 210.0, now, now, 1))
            batch_attempts.append((key, "sim", 1, 1, now, 205.0, 200, "ok", None, None))
            if len(batch_items) == 50_000:
                _flush(db, batch_items, batch_calls, batch_attempts)
        _flush(db, batch_items, batch_calls, batch_attempts)
        db.execute("ANALYZE")
    config = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
              "call": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return folder / "pipeline.yaml"


def _flush(db: sqlite3.Connection, items: list, calls: list, attempts: list) -> None:
    db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", items)
    db.executemany("INSERT INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                   "?, ?)", calls)
    db.executemany("INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", attempts)
    db.commit()
    items.clear(), calls.clear(), attempts.clear()


def timed(args: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flow", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        pipeline = str(build(Path(tmp), args.items))
        print(f"built a store of {args.items:,} results in {time.perf_counter() - started:.1f} s")
        out = str(Path(tmp) / "out.jsonl")
        commands = [
            ("status", ["status", pipeline]),
            ("status --json", ["status", pipeline, "--json"]),
            ("failures", ["failures", pipeline]),
            ("failures --error-class", ["failures", pipeline, "--error-class", "PostError"]),
            ("export -o (jsonl)", ["export", pipeline, "-o", out]),
            ("export --only failed", ["export", pipeline, "--only", "failed"]),
            ("export --format csv", ["export", pipeline, "--format", "csv", "-o", out]),
            ("show", ["show", pipeline, "item-0500000"]),
        ]
        print(f"{'command':<24} {'seconds':>8}  exit  target")
        for name, command in commands:
            seconds, code = timed(command)
            print(f"{name:<24} {seconds:>8.2f}  {code:>4}  {'met' if seconds < 3 else 'MISSED'}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
