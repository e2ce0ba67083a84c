"""flow against the bare SDK, side by side: requests/s, CPU per request and peak memory.

One `flow simulate` process (zero latency, OpenAI's rate-limit headers with limits far above
the pace, faults when asked) serves both clients, each in a fresh process of this process
tree, in interleaved pairs (bare first in odd pairs, flow first in even ones); the medians
are what count:

- the bare SDK: `AsyncOpenAI` on the aiohttp transport under a semaphore, its own retries
  (`max_retries`, as many tries as flow's default), replies parsed as `create` parses them,
  nothing persisted;
- flow: `flow run` on the same prompts and concurrency, every result checkpointed.

Requests/s is items over each client's own sending time (first request to last reply); CPU is
the client process's own (user + system, start-up included) per item.

    python bench/overhead.py [--items 10000] [--pairs 3] [--faults] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from simulator_process import simulator_process

TRIES = 8  # flow's default call.retry.max_tries; the bare SDK gets as many
FAULTS = ["--error-rate", "0.05", "--drop-rate", "0.01", "--seed", "17"]

BARE_SDK = textwrap.dedent("""
    import asyncio, json, sys, time
    import openai

    async def main(url, items, concurrency, retries):
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=retries,
                                    http_client=openai.DefaultAioHttpClient())
        gate = asyncio.Semaphore(concurrency)
        done = 0

        async def one(index):
            nonlocal done
            async with gate:
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=[
                        {"role": "user", "content": f"What is {index} plus {index}?"}])
                    done += 1
                except openai.APIError:
                    pass

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(items)))
        wall = time.perf_counter() - started
        await client.close()
        print(json.dumps({"wall_s": wall, "done": done}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
""")


def child_usage(before: resource.struct_rusage) -> tuple[float, float]:
    """CPU seconds of the children reaped since `before`, and the largest peak RSS (MB)."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_maxrss / 1024


def peak_of(pid: int) -> float:
    """Peak RSS of a running child, from /proc (RUSAGE_CHILDREN keeps only the maximum)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(argv: list[str], cwd: Path | None = None) -> tuple[str, float, float]:
    """Run a client to its end: its stdout, CPU seconds and peak RSS (MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    peak = 0.0
    while child.poll() is None:
        peak = max(peak, peak_of(child.pid))
        time.sleep(0.05)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode not in (0, 1):
        raise RuntimeError(f"{argv[:3]} exited {child.returncode}")
    cpu, _ = child_usage(before)
    return out, cpu, peak


def bare_sdk(base: str, items: int, concurrency: int) -> dict[str, float]:
    out, cpu, peak = run_child([sys.executable, "-c", BARE_SDK, base + "/v1", str(items),
                                str(concurrency), str(TRIES - 1)])
    result: dict[str, float] = json.loads(out)
    return {**result, "per_s": items / result["wall_s"], "cpu_s": cpu, "peak_mb": peak}


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def write_flow_pipeline(folder: Path, base: str, items: int, concurrency: int) -> Path:
    with (folder / "rows.jsonl").open("w") as handle:
        for index in range(items):
            handle.write(json.dumps({"id": index, "q": f"What is {index} plus {index}?"}) + "\n")
    config = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
              "call": {"model": "gpt-4o-mini", "base_url": base + "/v1", "api_key": "sk-bench",
                       "messages": [{"role": "user", "content": "{{ q }}"}],
                       "concurrency": concurrency},
              "post": ["strip"]}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def flow_run(pipeline: Path, items: int) -> dict[str, float]:
    for old in pipeline.parent.glob("flow.db*"):
        old.unlink()
    _, cpu, peak = run_child([sys.executable, "-m", "flow", "run", str(pipeline)])
    with sqlite3.connect(pipeline.parent / "flow.db") as db:
        first, last = db.execute(
            "SELECT MIN(started_at), MAX(finished_at) FROM responses").fetchone()
        done = db.execute("SELECT COUNT(*) FROM outputs WHERE status = 'done'").fetchone()[0]
    wall = seconds(last) - seconds(first)
    return {"wall_s": wall, "done": done, "per_s": items / wall, "cpu_s": cpu, "peak_mb": peak}


def compare(items: int, pairs: int, concurrency: int, faults: bool) -> dict[str, Any]:
    """Run the pairs; every figure of every pair, and the medians."""
    runs: list[dict[str, dict[str, float]]] = []
    with simulator_process(*(FAULTS if faults else [])) as base, \
            tempfile.TemporaryDirectory() as tmp:
        pipeline = write_flow_pipeline(Path(tmp), base, items, concurrency)
        for pair in range(pairs):
            order = ("bare", "flow") if pair % 2 == 0 else ("flow", "bare")
            result: dict[str, dict[str, float]] = {}
            for name in order:
                result[name] = (bare_sdk(base, items, concurrency) if name == "bare"
                                else flow_run(pipeline, items))
            runs.append(result)
            print(f"  pair {pair + 1}: bare {result['bare']['per_s']:,.0f}/s, flow "
                  f"{result['flow']['per_s']:,.0f}/s, flow/bare "
                  f"{result['flow']['per_s'] / result['bare']['per_s']:.2f}", file=sys.stderr,
                  flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(run[name][key] for run in runs)

    summary: dict[str, Any] = {"items": items, "pairs": pairs, "faults": faults, "runs": runs}
    for name in ("bare", "flow"):
        summary[name] = {"per_s": median(name, "per_s"),
                         "cpu_ms": 1000 * median(name, "cpu_s") / items,
                         "peak_mb": median(name, "peak_mb"),
                         "done_min": min(run[name]["done"] for run in runs)}
    summary["ratio"] = statistics.median(run["flow"]["per_s"] / run["bare"]["per_s"]
                                         for run in runs)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--faults", action="store_true",
                        help="the simulator answers 5%% of requests 500 and drops 1%%")
    parser.add_argument("--json", action="store_true", help="the summary as JSON")
    args = parser.parse_args()
    summary = compare(args.items, args.pairs, args.concurrency, args.faults)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.items:,} prompts, concurrency {args.concurrency}, {args.pairs} pairs"
          f"{', 5% 500s and 1% dropped connections' if args.faults else ''}; medians:")
    print(f"{'client':<22} {'requests/s':>11} {'CPU ms/request':>15} {'peak RSS MB':>12} "
          f"{'done (least)':>13}")
    for name, label in (("bare", "bare SDK (semaphore)"), ("flow", "flow, checkpointed")):
        row = summary[name]
        print(f"{label:<22} {row['per_s']:>11,.0f} {row['cpu_ms']:>15.3f} "
              f"{row['peak_mb']:>12.0f} {row['done_min']:>13,}")
    print(f"flow / bare SDK (median of the pairs' ratios): {summary['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    raise SystemExit(main())
