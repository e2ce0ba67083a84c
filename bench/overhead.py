"""What does flow cost over the raw SDK? Requests/s, CPU per request and memory, side by side.

One `flow simulate` process (zero latency, no limits) serves both clients in turn:

1. its capacity, measured with `wrk` (a C load generator) when it is installed;
2. the bare SDK: `AsyncOpenAI` on the aiohttp transport, a semaphore of 100, no persistence;
3. flow: `flow run` on the same prompts, concurrency 100, every result checkpointed.

Each client runs in a fresh process; CPU seconds and peak RSS are that process's own.

    python bench/overhead.py [--items 30000] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import yaml
from simulator_process import simulator_process

BARE_SDK = textwrap.dedent("""
    import asyncio, json, resource, sys, time
    import openai

    async def main(url, items, concurrency):
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=0,
                                    http_client=openai.DefaultAioHttpClient())
        gate = asyncio.Semaphore(concurrency)

        async def one(index):
            async with gate:
                await client.chat.completions.create(model="gpt-4o-mini", messages=[
                    {"role": "user", "content": f"What is {index} plus {index}?"}])

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(i) for i in range(items)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        await client.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_mb": peak}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")

WRK_SCRIPT = ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
              'wrk.body = \'{"model": "gpt-4o-mini", "messages": [{"role": "user", '
              '"content": "What is 1 plus 1?"}]}\'\n')


def capacity(base: str, folder: Path) -> float | None:
    if shutil.which("wrk") is None:
        return None
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(["wrk", "-t2", "-c64", "-d5s", "-s", str(script),
                          base + "/v1/chat/completions"], capture_output=True, text=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else None


def bare_sdk(base: str, items: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", BARE_SDK, base + "/v1", str(items),
                          str(concurrency)], capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out)
    result["per_s"] = items / result["wall_s"]
    return result


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def flow_run(base: str, items: int, concurrency: int, folder: Path) -> dict[str, float]:
    with (folder / "rows.jsonl").open("w") as handle:
        for index in range(items):
            handle.write(json.dumps({"id": index, "q": f"What is {index} plus {index}?"}) + "\n")
    config = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
              "call": {"model": "gpt-4o-mini", "base_url": base + "/v1", "api_key": "sk-bench",
                       "messages": [{"role": "user", "content": "{{ q }}"}],
                       "concurrency": concurrency},
              "post": ["strip"]}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flow", "run", str(folder / "pipeline.yaml")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    process_wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with sqlite3.connect(folder / "flow.db") as db:
        first, last, done = db.execute(
            "SELECT MIN(started_at), MAX(finished_at), COUNT(*) FROM responses").fetchone()
    wall = seconds(last) - seconds(first)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "process_wall_s": process_wall, "cpu_s": cpu, "done": done,
            "per_s": done / wall, "peak_mb": after.ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    with simulator_process() as base, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        served = capacity(base, folder)
        bare = bare_sdk(base, args.items, args.concurrency)
        flow = flow_run(base, args.items, args.concurrency, folder)
    print(f"server capacity (wrk, 64 connections): "
          f"{'wrk not installed' if served is None else f'{served:,.0f} requests/s'}")
    print(f"{'client':<28} {'requests/s':>11} {'CPU ms/request':>15} {'peak RSS MB':>12}")
    for name, result in (("bare SDK (semaphore)", bare), ("flow, checkpointed", flow)):
        cpu_ms = 1000 * result["cpu_s"] / args.items
        print(f"{name:<28} {result['per_s']:>11,.0f} {cpu_ms:>15.3f} {result['peak_mb']:>12.0f}")
    ratio = flow["per_s"] / bare["per_s"]
    print(f"flow / bare SDK: {ratio:.1%} (target >= 90%: {'met' if ratio >= 0.9 else 'MISSED'}); "
          f"flow's whole process, start-up and input reading included: "
          f"{args.items / flow['process_wall_s']:,.0f} items/s")
    return 0


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    raise SystemExit(main())
