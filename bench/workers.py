"""Many workers on one PostgreSQL store: how fast the store claims and completes, how the
rate grows with worker processes, and whether a shared limit holds.

Starts a PostgreSQL server (`pgserver`, from the test extra) and `flow simulate` as its own
process, and prints one row per figure:

    python bench/workers.py                     # everything (about 2 minutes)
    python bench/workers.py --only store        # the store's claim-and-complete rate
    python bench/workers.py --only scale limit
    python bench/workers.py --only chain --repeat 3

- `store`: requests claimed in batches of 100 by 4 workers (a connection each, in one
  process) and completed through the store's group commit (a reply and an output each,
  fenced by lease), items per second, with the CPU seconds of this process and of the
  server's processes while they ran (Linux: read from /proc).
- `scale`: 1, 2 and 4 `flow worker` processes on 4,000 items against the simulator (no
  latency): the simulator's requests per second over the whole run.
- `chain`: 2 `flow worker` processes on 3,000 items of one stage, then of a chain of two
  (the second renders from the first's output: 6,000 requests), in turn, `--repeat` times:
  requests per second over the whole run, and CPU milliseconds per request of the workers
  and of the server (what handing each item on to its next stage costs).
- `limit`: 3 workers sharing one limit of 600 requests per sliding 60 s, for 90 s (200 ms
  latency): the most requests the simulator admitted in any 60 s (its share of the limit),
  and the 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pgserver
import psycopg
import yaml
from simulator_process import simulator_process

from flow.config.store_url import StoreURL
from flow.records import Attempt, ItemRecord, OutputRecord, ResponseRecord, Settled, Usage

API_KEY = "sk-bench-0123456789abcdef"


def new_database(server_url: str) -> str:
    name = f"b{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return server_url.replace("/postgres?", f"/{name}?")


def server_cpu_s(pid: int) -> float:
    """CPU seconds of the server process `pid` and of every process it started (sessions
    that ended are counted in its children's times)."""
    def fields(of: int) -> list[str]:
        text = Path(f"/proc/{of}/stat").read_text()
        return text[text.rindex(")") + 2:].split()

    ticks = sum(int(v) for v in fields(pid)[11:15])  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                child = fields(int(entry.name))
            except OSError:
                continue
            if int(child[1]) == pid:
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def store_rate(url: str, server_pid: int, items: int = 40_000, tasks: int = 4,
                     claim: int = 100) -> dict[str, float]:
    """Claimed and completed per second, through the store's own calls, by `tasks` workers
    (each its own connection, as worker processes have); the CPU seconds of this process
    and of the server while they worked."""
    from flow.store.postgres.store import PostgresStore

    stores = [await PostgresStore.open(StoreURL(url)) for _ in range(tasks)]
    for store in stores:
        store.worker_session = True
        await store.start_run(Path("bench.yaml"), "bench", "bench")
    store = stores[0]
    for start in range(0, items, 5000):
        chunk = range(start, min(items, start + 5000))
        await store.save_items("call", "bench", [
            ItemRecord(f"i{n}", n, None, f"k{n}") for n in chunk])
        await store.queue.enqueue("call", "bench", [(f"k{n}", "{}") for n in chunk])
    await store.analyze()  # as `flow plan` does

    async def work(store: PostgresStore) -> int:
        done = 0
        while claimed := await store.queue.claim("bench", ["call"], claim, 30):
            await asyncio.gather(*(store.save(settled(c.key, c.token)) for c in claimed))
            done += len(claimed)
        return done

    server_before, client_before = server_cpu_s(server_pid), time.process_time()
    started = time.perf_counter()
    done = sum(await asyncio.gather(*(work(store) for store in stores)))
    elapsed = time.perf_counter() - started
    client = time.process_time() - client_before
    server = server_cpu_s(server_pid) - server_before
    for store in stores:
        await store.close()
    assert done == items, (done, items)
    return {"items_per_s": items / elapsed, "client_cpu_s": client, "server_cpu_s": server}


def settled(key: str, token: int) -> Settled:
    item = "i" + key[1:]
    response = ResponseRecord(key, "bench", "m", "{}", '{"choices": []}', Usage(10, 5), 0.0001,
                              1, 1.0, "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.001Z")
    output = OutputRecord(item, key, "done", "p", '"ok"', bought=True, attempts=1)
    return Settled("call", "bench", key, "2026-01-01T00:00:00.001Z", response,
                   [Attempt(1, "2026-01-01T00:00:00.000Z", 1.0, 200, "ok")], [output],
                   lease=token)


def pipeline(folder: Path, url: str, sim_url: str, items: int, **call: Any) -> Path:
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{n}", "q": f"What is {n}?"}) + "\n"
                            for n in range(items)))
    file = folder / "pipeline.yaml"
    file.write_text(yaml.safe_dump({"store": url, "load": {"path": str(rows), "id": "id"},
                                    "call": {"model": "gpt-4o-mini", "base_url": sim_url + "/v1",
                                             "messages": [{"role": "user", "content": "{{ q }}"}],
                                             "concurrency": 64, **call}}))
    return file


def flow(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "flow", *args], check=True,
                   env={**os.environ, "OPENAI_API_KEY": API_KEY}, stderr=subprocess.DEVNULL)


def sim_stats(sim_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(sim_url + "/sim/stats") as reply:
        stats: dict[str, Any] = json.load(reply)
    return stats


def scale(server_url: str, processes: int, items: int = 4000) -> float:
    """Requests per second of `processes` workers on `items`."""
    with tempfile.TemporaryDirectory() as folder, simulator_process() as sim_url:
        file = pipeline(Path(folder), new_database(server_url), sim_url, items)
        flow("plan", str(file))
        started = time.perf_counter()
        flow("worker", str(file), "--processes", str(processes))
        elapsed = time.perf_counter() - started
        assert sim_stats(sim_url)["requests"] >= items
        return items / elapsed


def chained(server_url: str, server_pid: int, stages: int, items: int = 3000,
            processes: int = 2) -> dict[str, float]:
    """Requests per second of `processes` workers on `items` through `stages` stages, and the
    CPU milliseconds per request of the workers and of the server."""
    with tempfile.TemporaryDirectory() as folder, simulator_process() as sim_url:
        file = pipeline(Path(folder), new_database(server_url), sim_url, items)
        if stages == 2:
            config = yaml.safe_load(file.read_text())
            answer = {"name": "answer", **config.pop("call")}
            grade = {**answer, "name": "grade",
                     "messages": [{"role": "user", "content": "Grade: {{ answer.output }}"}]}
            config["stages"] = [answer, grade]
            file.write_text(yaml.safe_dump(config))
        flow("plan", str(file))
        before, server_before = resource.getrusage(resource.RUSAGE_CHILDREN), server_cpu_s(
            server_pid)
        started = time.perf_counter()
        flow("worker", str(file), "--processes", str(processes))
        elapsed = time.perf_counter() - started
        after, server = resource.getrusage(resource.RUSAGE_CHILDREN), server_cpu_s(server_pid)
        requests = int(sim_stats(sim_url)["requests"])
        assert requests >= items * stages, (requests, items * stages)
    workers = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"requests_per_s": requests / elapsed,
            "worker_cpu_ms": 1000 * workers / requests,
            "server_cpu_ms": 1000 * (server - server_before) / requests}


def shared_limit(server_url: str, seconds: float = 90.0) -> dict[str, Any]:
    """3 workers on one limit of 600 per sliding 60 s, stopped after `seconds`."""
    args = ["--rpm", "600", "--window", "sliding-60s", "--latency-ms", "200"]
    with tempfile.TemporaryDirectory() as folder, simulator_process(*args) as sim_url:
        file = pipeline(Path(folder), new_database(server_url), sim_url, 2000, rpm=600)
        flow("plan", str(file))
        children = [subprocess.Popen([sys.executable, "-m", "flow", "worker", str(file)],
                                     env={**os.environ, "OPENAI_API_KEY": API_KEY},
                                     stderr=subprocess.DEVNULL) for _ in range(3)]
        time.sleep(seconds)
        for child in children:
            child.send_signal(2)
        for child in children:
            child.wait(60)
        stats = sim_stats(sim_url)
    limited = stats["by_status"].get("429", 0)
    # the simulator's own count of the busiest 60 s: over the limit never, near it in use
    return {"requests": stats["requests"], "429s": limited,
            "429_share": round(limited / max(stats["requests"], 1), 4),
            "busiest_60s": stats["window_peak"],
            "share_of_limit": round(stats["window_peak"] / 600, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=("store", "scale", "limit", "chain"))
    parser.add_argument("--limit-s", type=float, default=90.0,
                        help="how long the workers run under the shared limit (the busiest "
                             "60 s of it is counted; workers take a few seconds to start)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure the store this many times (the machine is noisy)")
    args = parser.parse_args()
    chosen = set(args.only or ("store", "scale", "limit", "chain"))
    with tempfile.TemporaryDirectory() as pgdata:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        url = str(server.get_uri())
        if "store" in chosen:
            pid = server.get_pid()
            assert pid is not None
            for _ in range(args.repeat):
                got = asyncio.run(store_rate(new_database(url), pid))
                print(f"store: {got['items_per_s']:,.0f} items/s claimed and completed "
                      f"(target >= 5,000); CPU s for 40,000 items: client "
                      f"{got['client_cpu_s']:.2f}, server {got['server_cpu_s']:.2f}")
        if "scale" in chosen:
            for processes in (1, 2, 4):
                print(f"scale: {processes} worker processes: "
                      f"{scale(url, processes):,.0f} requests/s")
        if "chain" in chosen:
            pid = server.get_pid()
            assert pid is not None
            runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
            for _ in range(args.repeat):  # interleaved: the machine's load hits both alike
                for stages in (1, 2):
                    runs[stages].append(chained(url, pid, stages))
                    print(f"chain: {stages} stage(s): {json.dumps(runs[stages][-1])}")
            for stages, found in runs.items():
                medians = {key: round(statistics.median(r[key] for r in found), 2)
                           for key in found[0]}
                print(f"chain: {stages} stage(s), medians of {len(found)}: "
                      f"{json.dumps(medians)}")
        if "limit" in chosen:
            print(f"limit: {json.dumps(shared_limit(url, args.limit_s))}")
        server.cleanup()


if __name__ == "__main__":
    main()
