"""Do `status`, `failures` and `export` stay fast on a store of 1,000,000 results?

Builds the store a finished run leaves, as flow writes it: 1,000,000 items, each with its
output and (when one came) the reply it bought, 2% failed across three error classes (a 400
and timeouts with their attempts and no reply, a post step failing on a paid reply). Then
times each command as a user runs it: a fresh `python -m flow ...` process, start-up
included. Target: each under 3 s on 2 cores.

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
from typing import Any

import yaml

from flow.config import load_config
from flow.endpoints import endpoint_origin
from flow.errors import PostError
from flow.keys import key_of_json
from flow.post import PostProcessor
from flow.prices import cost_usd, price_for
from flow.records import STAGE
from flow.render import RequestBuilder
from flow.store.migrations import prepare_store

ERRORS = ("BadRequestError", "PostError", "APITimeoutError")
RUN_ID = 1
NOW = "2026-11-25T00:00:00.000Z"
PROMPT_TOKENS, COMPLETION_TOKENS = 40, 12
TIMEOUT_WAIT_S = 1.0  # the backoff wait after each timed-out attempt but the last


def build(folder: Path, items: int) -> Path:
    pipeline = folder / "pipeline.yaml"
    spec = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
            "call": {"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:8000/v1",
                     "messages": [{"role": "user", "content": "{{ question }}"}]},
            "post": ["json"]}
    pipeline.write_text(yaml.safe_dump(spec))
    config = load_config(pipeline)
    builder = RequestBuilder(config.call)
    post = PostProcessor(config.post, config.file.parent)
    origin = endpoint_origin(config.call.base_url, simulated=False)
    cost = cost_usd(price_for(config.call.model, config.call.price), PROMPT_TOKENS,
                    COMPLETION_TOKENS, 0)
    timeout_s, tries = config.call.timeout_s, config.call.retry.max_tries
    prepare_store(config.store)
    rng = random.Random(1)
    with sqlite3.connect(config.store) as db:
        db.execute("INSERT INTO runs (id, pipeline, origin, endpoint, pid, started_at, "
                   "finished_at, state) VALUES (?, ?, ?, ?, 1, ?, ?, 'finished')",
                   (RUN_ID, str(pipeline), origin, config.call.base_url, NOW, NOW))
        batch: dict[str, list[tuple[Any, ...]]] = {
            "items": [], "responses": [], "outputs": [], "attempts": []}
        paid = 0
        for index in range(items):
            item_id = f"item-{index:07d}"
            fields = {"id": item_id, "question": f"What is {index}?"}
            request, request_json = builder.build_with_json(fields, "")
            key = key_of_json(request_json)
            error_class = rng.choice(ERRORS) if rng.random() < 0.02 else None
            batch["items"].append((STAGE, item_id, index + 1,
                                   json.dumps(fields, ensure_ascii=False), key, origin, None,
                                   None, NOW))
            failed = (STAGE, item_id, key, origin, "failed", None, post.fingerprint,
                      error_class)
            if error_class == "BadRequestError":
                error = "400: Invalid value for 'messages'"
                batch["attempts"].append((key, origin, RUN_ID, 1, NOW, 205.0, 400, "error",
                                          error, None))
                batch["outputs"].append((*failed, error, None, 0, 1, NOW, RUN_ID))
            elif error_class == "APITimeoutError":
                error = f"no response within {timeout_s:g} s"
                batch["attempts"].extend(
                    (key, origin, RUN_ID, number, NOW, timeout_s * 1000, None, "timeout",
                     error, TIMEOUT_WAIT_S if number < tries else None)
                    for number in range(1, tries + 1))
                spent_s = tries * timeout_s + (tries - 1) * TIMEOUT_WAIT_S
                batch["outputs"].append(
                    (*failed, f"gave up after {tries} attempts in {spent_s:.1f} s: {error}",
                     None, 0, tries, NOW, RUN_ID))
            else:
                # a reply came at the first attempt and this item bought it; a post step may
                # still fail on it
                paid += 1
                text = (f"It is {index}." if error_class == "PostError"
                        else json.dumps({"answer": index}))
                batch["responses"].append((
                    paid, key, origin, request["model"], request_json,
                    _body(config.call.model, text), PROMPT_TOKENS, COMPLETION_TOKENS, 0, cost,
                    1, 210.0, NOW, NOW, RUN_ID))
                try:
                    made = json.dumps(post.apply(text), ensure_ascii=False)
                    batch["outputs"].append((STAGE, item_id, key, origin, "done", made,
                                             post.fingerprint, None, None, paid, 1, 1, NOW,
                                             RUN_ID))
                except PostError as e:
                    batch["outputs"].append((*failed, str(e), paid, 1, 1, NOW, RUN_ID))
            if len(batch["items"]) == 50_000:
                _flush(db, batch)
        _flush(db, batch)
        db.execute(
            "UPDATE runs SET items_total = ?, "
            "items_done = (SELECT COUNT(*) FROM outputs WHERE status = 'done'), "
            "items_failed = (SELECT COUNT(*) FROM outputs WHERE status = 'failed'), "
            "calls_made = (SELECT COUNT(*) FROM attempts) + "
            "(SELECT COUNT(*) FROM responses WHERE attempts = 1), "
            "prompt_tokens = (SELECT SUM(prompt_tokens) FROM responses), "
            "completion_tokens = (SELECT SUM(completion_tokens) FROM responses), "
            "cost_usd = (SELECT COALESCE(SUM(cost_usd), 0) FROM responses) WHERE id = ?",
            (items, RUN_ID))
        db.execute("ANALYZE")
    return pipeline


def _body(model: str, text: str) -> str:
    """A chat completion body as an OpenAI-compatible endpoint sends it."""
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": text, "refusal": None}}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                  "prompt_tokens_details": {"cached_tokens": 0}}})


def _flush(db: sqlite3.Connection, batch: dict[str, list[tuple[Any, ...]]]) -> None:
    for table, columns in (
            ("items", "stage, item_id, row, input, request_key, origin, error_class, error, "
                      "updated_at"),
            ("responses", "id, request_key, origin, model, request, body, prompt_tokens, "
                          "completion_tokens, cached_tokens, cost_usd, attempts, latency_ms, "
                          "started_at, finished_at, run_id"),
            ("outputs", "stage, item_id, request_key, origin, status, output, post_key, "
                        "error_class, error, response_id, bought, attempts, finished_at, run_id"),
            ("attempts", "request_key, origin, run_id, number, started_at, latency_ms, "
                         "status_code, outcome, error, wait_s")):
        marks = ", ".join("?" * (columns.count(",") + 1))
        db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", batch[table])
        batch[table].clear()
    db.commit()


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
