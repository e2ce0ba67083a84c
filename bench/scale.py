"""Memory that does not grow with the input, and a resume that skips a million done items fast.

Three measurements, each `flow run` in a fresh process against `flow simulate` in another
(zero latency, concurrency 100), with the flow process's RSS sampled every 0.2 s:

1. a 1,000,000-row input: peak RSS over the first 60 s (then Ctrl-C, drained);
2. a whole 100,000-row run: peak RSS, and RSS when 10,000 and when 100,000 items are done;
3. a re-run over a store where all 1,000,000 items are done: items skipped per second and
   requests received by the server (the store is built with flow's own request builder and
   content keys, as a finished run leaves it, to spare 15 minutes of calls).

    python bench/scale.py [--only memory|full|resume]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from simulator_process import simulator_process

from flow.config import load_config
from flow.endpoints import endpoint_origin
from flow.keys import key_of_json
from flow.load import read_rows
from flow.post import PostProcessor
from flow.prices import cost_usd, price_for
from flow.records import STAGE, utc_now
from flow.render import RequestBuilder
from flow.store.migrations import prepare_store
from flow.unchanged import render_fingerprint

TARGET_PEAK_MB = 120
TARGET_RESUME_PER_S = 100_000
MEMORY_S = 60
RUN_ID = 1  # the run that built the done store; the re-run is the next
REPLY = "done"
PROMPT_TOKENS, COMPLETION_TOKENS = 20, 5


def write_pipeline(folder: Path, rows: int, base: str) -> Path:
    with (folder / "rows.jsonl").open("w") as handle:
        for index in range(rows):
            handle.write(json.dumps({"id": f"row-{index:07d}",
                                     "q": f"What is {index} plus {index}?"}) + "\n")
    config = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
              "call": {"model": "gpt-4o-mini", "base_url": base, "api_key": "sk-bench",
                       "messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": "{{ q }}"}],
                       "concurrency": 100},
              "post": ["strip"]}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler(threading.Thread):
    """RSS of a process every 0.2 s, with the store's count of results at that moment."""

    def __init__(self, pid: int, store: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.store = pid, store
        self.samples: list[tuple[float, float, int]] = []
        self.running = True

    def run(self) -> None:
        started = time.monotonic()
        while self.running:
            rss = rss_mb(self.pid)
            if rss:
                self.samples.append((time.monotonic() - started, rss, self.done()))
            time.sleep(0.2)

    def done(self) -> int:
        try:
            with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=1) as db:
                return int(db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0])
        except sqlite3.Error:
            return 0

    def rss_at(self, done: int) -> float:
        return next((rss for _, rss, count in self.samples if count >= done), 0.0)


def run_flow(pipeline: Path, stop_after_s: float | None = None) -> tuple[Sampler, float]:
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "flow", "run", str(pipeline)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = Sampler(child.pid, pipeline.parent / "flow.db")
    sampler.start()
    if stop_after_s is not None:
        try:
            child.wait(stop_after_s)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)
    child.wait()
    elapsed = time.monotonic() - started
    sampler.running = False
    sampler.join()
    return sampler, elapsed


def build_done_store(pipeline: Path) -> int:
    """The store a finished run leaves: every item done from a reply it bought, keyed,
    post-processed and numbered as flow does it (every row asks a different question, so
    each item renders a request of its own and pays for its reply)."""
    config = load_config(pipeline)
    builder = RequestBuilder(config.call)
    post = PostProcessor(config.post, config.file.parent)
    origin = endpoint_origin(config.call.base_url, simulated=False)
    cost = cost_usd(price_for(config.call.model, config.call.price), PROMPT_TOKENS,
                    COMPLETION_TOKENS, 0)
    body = json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0,
        "model": config.call.model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": REPLY, "refusal": None}}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                  "prompt_tokens_details": {"cached_tokens": 0}}})
    output = json.dumps(post.apply(REPLY), ensure_ascii=False)
    prepare_store(config.store)
    now = utc_now()
    count = 0
    with sqlite3.connect(config.store) as db:
        db.execute("INSERT INTO runs (id, pipeline, origin, endpoint, pid, started_at, state) "
                   "VALUES (?, ?, ?, ?, ?, ?, 'running')",
                   (RUN_ID, str(config.file), origin, config.call.base_url, os.getpid(), now))
        items: list[tuple[Any, ...]] = []
        responses: list[tuple[Any, ...]] = []
        outputs: list[tuple[Any, ...]] = []
        for row in read_rows(config.load):
            assert row.fields is not None
            request, request_json = builder.build_with_json(row.fields, "")
            key = key_of_json(request_json)
            count += 1
            items.append((STAGE, row.item_id, row.number,
                          json.dumps(row.fields, ensure_ascii=False), key, origin, None, None,
                          now))
            responses.append((count, key, origin, request["model"], request_json, body,
                              PROMPT_TOKENS, COMPLETION_TOKENS, 0, cost, 1, 1.0, now, now,
                              RUN_ID))
            outputs.append((STAGE, row.item_id, key, origin, "done", output, post.fingerprint,
                            None, None, count, 1, 1, now, RUN_ID))
            if len(items) == 50_000:
                _flush(db, items, responses, outputs)
        _flush(db, items, responses, outputs)
        # a run that read the whole input records what its requests were rendered from
        db.execute("INSERT OR REPLACE INTO store_info VALUES (?, ?)",
                   (f"rendered:{STAGE}", render_fingerprint(config.load, config.chain[0])))
        db.execute("UPDATE runs SET finished_at=?, state='finished', items_total=?, "
                   "items_done=?, calls_made=?, prompt_tokens=?, completion_tokens=?, "
                   "cost_usd=? WHERE id=?",
                   (utc_now(), count, count, count, count * PROMPT_TOKENS,
                    count * COMPLETION_TOKENS, count * (cost or 0.0), RUN_ID))
    return count


def _flush(db: sqlite3.Connection, items: list[tuple[Any, ...]],
           responses: list[tuple[Any, ...]], outputs: list[tuple[Any, ...]]) -> None:
    db.executemany("INSERT INTO items (stage, item_id, row, input, request_key, origin, "
                   "error_class, error, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", items)
    db.executemany("INSERT INTO responses (id, request_key, origin, model, request, body, "
                   "prompt_tokens, completion_tokens, cached_tokens, cost_usd, attempts, "
                   "latency_ms, started_at, finished_at, run_id) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", responses)
    db.executemany("INSERT INTO outputs (stage, item_id, request_key, origin, status, output, "
                   "post_key, error_class, error, response_id, bought, attempts, finished_at, "
                   "run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", outputs)
    db.commit()
    for rows in (items, responses, outputs):
        rows.clear()


def server_requests(base: str) -> int:
    stats = json.load(urllib.request.urlopen(base.removesuffix("/v1") + "/sim/stats"))
    return int(stats["requests"])


def measure_memory(base: str, rows: int = 1_000_000, seconds: float = MEMORY_S) -> dict[str, Any]:
    """Peak RSS over the first `seconds` of a run over a `rows`-row input."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = write_pipeline(Path(tmp), rows, base)
        sampler, _ = run_flow(pipeline, stop_after_s=seconds)
        return {"rows": rows, "seconds": seconds, "done": sampler.samples[-1][2],
                "peak_mb": max(rss for _, rss, _ in sampler.samples)}


def measure_full(base: str, rows: int = 100_000) -> dict[str, Any]:
    """A whole run: its time, peak RSS, RSS by items done, and how long results waited."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = write_pipeline(Path(tmp), rows, base)
        sampler, elapsed = run_flow(pipeline)
        with sqlite3.connect(Path(tmp) / "flow.db") as db:
            mean_ms, max_ms, groups = db.execute(
                "SELECT commit_wait_mean_ms, commit_wait_max_ms, commit_groups "
                "FROM runs").fetchone()
    # the last samples are the run shutting down: 95 % done is the last steady one
    marks = [rows * share // 100 for share in (10, 25, 50, 75, 95)]
    curve = {mark: sampler.rss_at(mark) for mark in marks}
    return {"rows": rows, "elapsed_s": elapsed,
            "peak_mb": max(rss for _, rss, _ in sampler.samples), "curve": curve,
            "growth": (curve[marks[-1]] - curve[marks[0]]) / curve[marks[0]],
            "commit_groups": groups, "wait_mean_ms": mean_ms, "wait_max_ms": max_ms}


def measure_resume(base: str, rows: int = 1_000_000) -> dict[str, Any]:
    """A re-run over a store where all `rows` items are done: items/s and requests sent."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = write_pipeline(Path(tmp), rows, base)
        built = build_done_store(pipeline)
        before = server_requests(base)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler, elapsed = run_flow(pipeline)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        calls = server_requests(base) - before
        with sqlite3.connect(Path(tmp) / "flow.db") as db:
            skipped = db.execute("SELECT items_skipped FROM runs WHERE id > ?",
                                 (RUN_ID,)).fetchone()[0]
    return {"rows": built, "skipped": skipped, "elapsed_s": elapsed,
            "per_s": skipped / elapsed, "calls": calls,
            "cpu_s": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
            "peak_mb": max(rss for _, rss, _ in sampler.samples)}


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("memory", "full", "resume"))
    args = parser.parse_args()
    with simulator_process() as root:
        base = root + "/v1"
        if args.only in (None, "memory"):
            memory = measure_memory(base)
            print(f"1,000,000-row input, first {MEMORY_S} s: {memory['done']:,} items done, "
                  f"peak RSS {memory['peak_mb']:.0f} MB (target <= {TARGET_PEAK_MB}: "
                  f"{verdict(memory['peak_mb'] <= TARGET_PEAK_MB)})", flush=True)
        if args.only in (None, "full"):
            full = measure_full(base)
            curve = ", ".join(f"{n // 1000}k: {mb:.0f}" for n, mb in full["curve"].items())
            print(f"100,000-row run: {full['elapsed_s']:.0f} s, peak RSS {full['peak_mb']:.0f} MB "
                  f"(target <= {TARGET_PEAK_MB}: {verdict(full['peak_mb'] <= TARGET_PEAK_MB)}); "
                  f"RSS from 10% to 95% done {full['growth']:+.1%} (target within 10%: "
                  f"{verdict(abs(full['growth']) <= 0.1)})", flush=True)
            print(f"  RSS (MB) by items done: {curve}", flush=True)
            print(f"  commits: {full['commit_groups']:,} groups; a result waited "
                  f"{full['wait_mean_ms']:.1f} ms on average, {full['wait_max_ms']:.1f} ms at "
                  "most, between arriving and being on disk", flush=True)
        if args.only in (None, "resume"):
            resume = measure_resume(base)
            print(f"re-run over {resume['rows']:,} done items: {resume['skipped']:,} skipped in "
                  f"{resume['elapsed_s']:.1f} s ({resume['cpu_s']:.1f} CPU s) = "
                  f"{resume['per_s']:,.0f} items/s (target >= "
                  f"{TARGET_RESUME_PER_S:,}: {verdict(resume['per_s'] >= TARGET_RESUME_PER_S)}), "
                  f"{resume['calls']} requests sent, peak RSS {resume['peak_mb']:.0f} MB",
                  flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    raise SystemExit(main())
