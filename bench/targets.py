"""Every speed and memory target in one run, one table: met or missed.

Runs the quick form of each benchmark (bench/overhead.py, bench/scale.py, and with
`--limits` the token rows of bench/rate_limits.py) against `flow simulate` with its defaults
(OpenAI's rate-limit headers on every answer, limits far above the pace) and prints a row per
target. Run it before an issue that touches speed or memory is called resolved, and paste
its output into docs/benchmarks.md.

    python bench/targets.py                  # about 25 minutes on 2 cores
    python bench/targets.py --large 30000    # the large throughput row at 30,000 prompts
    python bench/targets.py --limits         # also the token rows (about 4 minutes more)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime

import rate_limits
from overhead import compare
from scale import (
    MEMORY_S,
    TARGET_PEAK_MB,
    TARGET_RESUME_PER_S,
    measure_full,
    measure_memory,
    measure_resume,
)
from simulator_process import simulator_process

LIMIT_ROWS = ("tpm-bucket-1s", "tpm-sliding-1s")


@dataclass
class Row:
    target: str
    measured: str
    met: bool


def throughput_row(items: int, pairs: int, faults: bool) -> Row:
    result = compare(items, pairs, 100, faults)
    bare, flow = result["bare"], result["flow"]
    floor = 0.95 if faults else 1.0
    every = flow["done_min"] == items
    ratios = " / ".join(f"{run['flow']['per_s'] / run['bare']['per_s']:.2f}"
                        for run in result["runs"])
    measured = (f"flow {flow['per_s']:,.0f}/s, {flow['cpu_ms']:.3f} CPU ms/request; bare SDK "
                f"{bare['per_s']:,.0f}/s, {bare['cpu_ms']:.3f} CPU ms/request; flow/bare "
                f"{result['ratio']:.2f} (median of {pairs} pair{'s' * (pairs != 1)}; "
                f"{ratios})")
    if faults:
        measured += f"; flow done {flow['done_min']:,} of {items:,}, bare {bare['done_min']:,}"
    what = (f"{items:,} prompts, concurrency 100"
            + (", 5% 500s, 1% dropped" if faults else ", zero latency")
            + f": flow/bare >= {floor:.2f}" + (", every item done" if faults else ""))
    return Row(what, measured, result["ratio"] >= floor and (every or not faults))


def headers_row(base: str) -> Row:
    request = urllib.request.Request(
        base + "/v1/chat/completions", method="POST",
        data=json.dumps({"model": "gpt-4o-mini",
                         "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        names = sorted(name.lower() for name in response.headers if
                       name.lower().startswith("x-ratelimit-limit"))
        values = [response.headers[name] for name in names]
    return Row("the simulator sends OpenAI's rate-limit headers by default",
               ", ".join(f"{name}: {value}" for name, value in zip(names, values)) or "none",
               len(names) == 2)


def limit_rows() -> list[Row]:
    rows = []
    for scenario in (s for s in rate_limits.SCENARIOS if s.name in LIMIT_ROWS):
        result = rate_limits.measure(scenario)
        met = rate_limits.verdict(scenario, result, None) == "met"
        rows.append(Row(f"bench/rate_limits.py {scenario.name}: >= 95% of the tpm, <= 1% 429s",
                        f"{result['done']:,} of {result['items']:,} done, "
                        f"{result['tpm_used_pct']:.1f}% of the tpm, {result['429_pct']:.2f}% "
                        f"429s ({result['429s']}), {result['per_s']:.1f} items/s", met))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=3)
    # two pairs: one with each client first (the one that runs second meets another load)
    parser.add_argument("--large-pairs", type=int, default=2)
    parser.add_argument("--limits", action="store_true",
                        help=f"also run bench/rate_limits.py --only {' '.join(LIMIT_ROWS)}")
    args = parser.parse_args()
    started = time.monotonic()
    rows: list[Row] = []

    def note(row: Row) -> None:
        rows.append(row)
        print(f"[{time.monotonic() - started:5.0f} s] {'met' if row.met else 'MISSED'}: "
              f"{row.target}: {row.measured}", file=sys.stderr, flush=True)

    with simulator_process() as root:
        note(headers_row(root))
    note(throughput_row(args.items, args.pairs, faults=False))
    note(throughput_row(args.large, args.large_pairs, faults=False))
    note(throughput_row(args.items, args.pairs, faults=True))
    with simulator_process() as root:
        base = root + "/v1"
        memory = measure_memory(base)
        note(Row(f"1,000,000-row input, first {MEMORY_S} s: peak RSS <= {TARGET_PEAK_MB} MB",
                 f"{memory['peak_mb']:.0f} MB ({memory['done']:,} items done)",
                 memory["peak_mb"] <= TARGET_PEAK_MB))
        full = measure_full(base)
        curve = ", ".join(f"{n // 1000}k: {mb:.0f}" for n, mb in full["curve"].items())
        note(Row(f"whole 100,000-row run: peak RSS <= {TARGET_PEAK_MB} MB, flat once warm "
                 "(10% to 95% done within 10%)",
                 f"{full['peak_mb']:.0f} MB in {full['elapsed_s']:.0f} s; {full['growth']:+.1%} "
                 f"(MB by items done: {curve})",
                 full["peak_mb"] <= TARGET_PEAK_MB and abs(full["growth"]) <= 0.1))
        resume = measure_resume(base)
        note(Row(f"resume over 1,000,000 done items: >= {TARGET_RESUME_PER_S:,} items/s, "
                 "zero calls",
                 f"{resume['per_s']:,.0f} items/s ({resume['skipped']:,} in "
                 f"{resume['elapsed_s']:.1f} s, {resume['cpu_s']:.1f} CPU s), "
                 f"{resume['calls']} calls",
                 resume["per_s"] >= TARGET_RESUME_PER_S and resume["calls"] == 0))
    if args.limits:
        for row in limit_rows():
            note(row)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"`python bench/targets.py{' --limits' if args.limits else ''}` ({stamp}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end, "
          f"Python {platform.python_version()}, {time.monotonic() - started:.0f} s)\n")
    print("| target | measured | |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row.target} | {row.measured} | {'met' if row.met else '**missed**'} |")
    missed = sum(not row.met for row in rows)
    print(f"\n{len(rows) - missed} of {len(rows)} targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    raise SystemExit(main())
