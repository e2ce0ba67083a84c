"""Parquet in and out at a million rows: flat memory reading, seconds writing.

1. a 1,000,000-row Parquet input (row groups of 65,536 rows): `flow run` against
   `flow simulate` (zero latency, concurrency 100) for 30 s, peak RSS of the flow process;
2. `flow export -o results.parquet` of a store holding 1,000,000 done results (built as a
   finished run leaves it, see scale.py), timed, with the JSONL export of the same store for
   comparison, and read back with pyarrow.

    python bench/parquet.py [--only memory|export]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from scale import TARGET_PEAK_MB, build_done_store, run_flow
from simulator_process import simulator_process

ROWS = 1_000_000


def write_pipeline(folder: Path, rows: int, base: str) -> Path:
    """A pipeline over a Parquet input of `rows` rows, written a row group at a time."""
    schema = pa.schema([("id", pa.string()), ("q", pa.string()), ("n", pa.int64())])
    with pq.ParquetWriter(folder / "rows.parquet", schema) as writer:
        for start in range(0, rows, 65_536):
            stop = min(start + 65_536, rows)
            writer.write_table(pa.table({
                "id": [f"row-{i:07d}" for i in range(start, stop)],
                "q": [f"What is {i} plus {i}?" for i in range(start, stop)],
                "n": list(range(start, stop))}, schema=schema))
    config = {"store": "flow.db", "load": {"path": "rows.parquet", "id": "id"},
              "call": {"model": "gpt-4o-mini", "base_url": base, "api_key": "sk-bench",
                       "messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": "{{ q }}"}],
                       "concurrency": 100},
              "post": ["strip"]}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed_export(pipeline: Path, out: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flow", "export", str(pipeline), "-o", str(out)],
                   check=True, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("memory", "export"))
    parser.add_argument("--seconds", type=float, default=30,
                        help="how long the memory run goes before it is stopped")
    args = parser.parse_args()
    with simulator_process() as root:
        base = root + "/v1"
        if args.only in (None, "memory"):
            with tempfile.TemporaryDirectory() as tmp:
                pipeline = write_pipeline(Path(tmp), ROWS, base)
                sampler, _ = run_flow(pipeline, stop_after_s=args.seconds)
                peak = max(rss for _, rss, _ in sampler.samples)
                done = sampler.samples[-1][2]
                print(f"1,000,000-row Parquet input, first {args.seconds:g} s: {done:,} items "
                      f"done, peak RSS "
                      f"{peak:.0f} MB (target <= {TARGET_PEAK_MB}: "
                      f"{'met' if peak <= TARGET_PEAK_MB else 'MISSED'})", flush=True)
        if args.only in (None, "export"):
            with tempfile.TemporaryDirectory() as tmp:
                pipeline = write_pipeline(Path(tmp), ROWS, base)
                built = build_done_store(pipeline)
                parquet_s = timed_export(pipeline, Path(tmp) / "results.parquet")
                jsonl_s = timed_export(pipeline, Path(tmp) / "results.jsonl")
                table = pq.read_table(Path(tmp) / "results.parquet")
                size = (Path(tmp) / "results.parquet").stat().st_size / 1e6
                print(f"export of {built:,} results: Parquet {parquet_s:.1f} s ({size:.0f} MB, "
                      f"{table.num_rows:,} rows x {table.num_columns} columns read back), "
                      f"JSONL {jsonl_s:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    raise SystemExit(main())
