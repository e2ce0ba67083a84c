"""Kill flow with SIGKILL at random moments, again and again; prove nothing is lost or paid twice.

Each cycle starts `flow run` on the same pipeline against a simulator (in this process, so
it counts every request it receives), waits a random time, and kills the run with SIGKILL.
After every kill: `PRAGMA integrity_check` is ok and every result committed before is still
there. At the end, one run to completion, then: every item exported exactly once and done,
and the requests the server received are at most items + concurrency x kills.

    python bench/crash.py                       # 200 kills (a few minutes)
    python bench/crash.py --kills 20 --items 3000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from flow.simulator import SimulatorConfig, SimulatorThread


def write_pipeline(folder: Path, items: int, concurrency: int, base_url: str) -> Path:
    with (folder / "rows.jsonl").open("w") as handle:
        for index in range(items):
            handle.write(json.dumps({"id": f"r{index:06d}", "q": f"What is {index} + 1?"}) + "\n")
    config = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
              "call": {"model": "gpt-4o-mini", "base_url": base_url, "api_key": "sk-crash",
                       "messages": [{"role": "user", "content": "{{ q }}"}],
                       "concurrency": concurrency, "timeout_s": 10},
              "post": ["strip"]}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Each run is a process of its own, forked from a server that has flow and the SDK loaded:
# the kills land in flow's work, not in the interpreter's start-up (0.6 s of imports a run).
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["flow.cli", "flow.cli.running", "flow.run"])


def _flow_main(args: tuple[str, ...]) -> None:
    from flow.cli import main

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    raise SystemExit(main(list(args)))


def flow(*args: str) -> multiprocessing.process.BaseProcess:
    child = FORKS.Process(target=_flow_main, args=(args,))
    child.start()
    return child


def committed(store: Path) -> set[str]:
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",), "integrity_check"
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'responses'").fetchone():
            return set()  # killed before its schema was committed: nothing was
        twice = db.execute("SELECT COUNT(*) - COUNT(DISTINCT request_key) FROM responses")
        assert twice.fetchone() == (0,), "a stored reply was paid for again"
        return {key for (key,) in db.execute("SELECT request_key FROM responses")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--most-s", type=float, default=1.0,
                        help="each run is killed at a random moment up to this many seconds in")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    problems: list[str] = []
    with SimulatorThread(SimulatorConfig(latency_ms=args.latency_ms)) as server, \
            tempfile.TemporaryDirectory() as tmp:
        pipeline = str(write_pipeline(Path(tmp), args.items, args.concurrency, server.url))
        store = Path(tmp) / "flow.db"
        kills, seen = 0, set()
        started = time.monotonic()
        for cycle in range(args.kills):
            child = flow("run", pipeline)
            time.sleep(rng.uniform(0.01, args.most_s))
            if child.is_alive():
                child.kill()
                kills += 1
            child.join()
            if not store.exists():
                continue
            now = committed(store)
            if not seen <= now:
                problems.append(f"kill {cycle + 1}: {len(seen - now)} committed results lost")
            seen = now
        final = flow("run", pipeline)
        final.join()
        code = final.exitcode
        if code != 0:
            problems.append(f"the final run exited {code}")
        exported = subprocess.run([sys.executable, "-m", "flow", "export", pipeline],
                                  capture_output=True, text=True, check=True).stdout.splitlines()
        records = [json.loads(line) for line in exported]
        ids = [record["id"] for record in records]
        if len(ids) != args.items or len(set(ids)) != args.items:
            problems.append(f"exported {len(ids)} records, {len(set(ids))} distinct ids, "
                            f"expected {args.items}")
        if any(record["status"] != "done" for record in records):
            problems.append("some items are not done")
        committed(store)
        bound = args.items + args.concurrency * kills
        received = server.stats.requests
        if received > bound:
            problems.append(f"the server received {received} requests, above {bound}")
        print(f"kills {kills}, items {args.items}, concurrency {args.concurrency}: server "
              f"received {received} requests (bound {bound}, {received - args.items} beyond one "
              f"per item, at most {server.stats.max_per_request} for any one request), "
              f"exported {len(ids)} once each, integrity ok after every kill, "
              f"{time.monotonic() - started:.0f} s")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
