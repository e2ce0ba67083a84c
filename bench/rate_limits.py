"""Does flow run at the provider's limit, without a storm of 429s?

Starts `flow simulate` as its own process (200 ms latency, limits enforced), runs
`flow run` on a generated pipeline (concurrency 200) as another, and reads the outcome from
the store and the simulator's `/sim/stats`. Prints one row per scenario:

    python bench/rate_limits.py                 # all four scenarios (about 6 minutes)
    python bench/rate_limits.py --only learned  # one of: configured, learned, tpm, window
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from simulator_process import simulator_process

LATENCY_MS = 200
CONCURRENCY = 200


@dataclass
class Scenario:
    name: str
    items: int
    simulator: list[str]
    call: dict[str, Any]
    warmup_s: float = 0.0
    long_prompts: bool = False
    targets: dict[str, float] = field(default_factory=dict)


SCENARIOS = [
    Scenario("configured", 3000, ["--rpm", "6000", "--window", "second"], {"rpm": 6000},
             targets={"per_s": 95, "max_429_pct": 1}),
    Scenario("learned", 3000, ["--rpm", "6000", "--window", "second"], {}, warmup_s=10,
             targets={"per_s": 95, "max_429_pct": 1}),
    Scenario("tpm", 3000, ["--tpm", "300000", "--window", "second"], {"tpm": 300000},
             long_prompts=True, targets={"min_tpm_pct": 95, "max_429_pct": 1}),
    Scenario("window", 8000, ["--rpm", "6000", "--window", "minute"], {"rpm": 6000},
             targets={"max_429_pct": 1}),
]


def prompt(index: int, long: bool) -> str:
    if not long:
        return f"Question {index}: what is {index} times {index}?"
    # about 230 prompt tokens; the simulator's reply adds about 70
    words = " ".join(f"w{(index * 7 + k) % 997}" for k in range(110))
    return f"Question {index}: summarise these words: {words}"


def write_pipeline(folder: Path, scenario: Scenario, base_url: str) -> Path:
    rows = folder / "rows.jsonl"
    with rows.open("w") as handle:
        for index in range(scenario.items):
            handle.write(json.dumps({"id": index, "q": prompt(index, scenario.long_prompts)}) + "\n")
    config = {
        "store": "flow.db",
        "load": {"path": "rows.jsonl", "id": "id"},
        "call": {"model": "gpt-4o-mini", "base_url": base_url, "api_key": "sk-bench",
                 "messages": [{"role": "user", "content": "{{ q }}"}],
                 "params": {"max_tokens": 200}, "concurrency": CONCURRENCY, "timeout_s": 30,
                 "retry": {"max_tries": 8, "max_time_s": 600}, **scenario.call},
        "post": ["strip"],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def measure(scenario: Scenario) -> dict[str, Any]:
    with (simulator_process("--latency-ms", str(LATENCY_MS), *scenario.simulator) as base,
          tempfile.TemporaryDirectory() as tmp):
        pipeline = write_pipeline(Path(tmp), scenario, base + "/v1")
        code = subprocess.run([sys.executable, "-m", "flow", "run", str(pipeline)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        stats = json.load(urllib.request.urlopen(base + "/sim/stats", timeout=5))
        with sqlite3.connect(Path(tmp) / "flow.db") as db:
            started, finished = db.execute(
                "SELECT MIN(started_at), MAX(finished_at) FROM responses").fetchone()
            done = db.execute("SELECT COUNT(*) FROM results WHERE status='done'").fetchone()[0]
            failed = db.execute("SELECT COUNT(*) FROM results WHERE status='failed'").fetchone()[0]
            # each done item at the time its reply arrived
            finishes = [seconds(s) for (s,) in db.execute(
                "SELECT responses.finished_at FROM outputs JOIN responses "
                "ON responses.id = outputs.response_id WHERE outputs.status='done'")]
            tokens = db.execute("SELECT SUM(prompt_tokens + completion_tokens) FROM responses"
                                ).fetchone()[0] or 0
            # a reply at its first attempt is recorded in `responses` alone, not in `attempts`
            attempts = [(seconds(s), code_) for s, code_ in db.execute(
                "SELECT started_at, status_code FROM attempts UNION ALL "
                "SELECT started_at, 200 FROM responses WHERE attempts = 1")]
            commit_mean, commit_max = db.execute(
                "SELECT commit_wait_mean_ms, commit_wait_max_ms FROM runs").fetchone()
    t0, t1 = seconds(started), seconds(finished)
    wall = t1 - t0
    cut = t0 + scenario.warmup_s
    after = [t for t in finishes if t >= cut]
    sent_after = [c for t, c in attempts if t >= cut]
    requests = stats["requests"]
    limited = stats["by_status"].get("429", 0)
    result = {
        "scenario": scenario.name, "items": scenario.items, "exit": code, "done": done,
        "failed": failed, "wall_s": round(wall, 1),
        "per_s": round(len(after) / max(t1 - cut, 1e-9), 1),
        "requests": requests, "429s": limited,
        "429_pct": round(100 * sum(1 for c in sent_after if c == 429) / max(len(sent_after), 1), 2),
        "tpm_used_pct": None, "commit_ms": f"{commit_mean:.1f}/{commit_max:.1f}",
    }
    if "tpm" in scenario.call:
        result["tpm_used_pct"] = round(100 * tokens / wall * 60 / scenario.call["tpm"], 1)
    return result


def verdict(scenario: Scenario, result: dict[str, Any]) -> str:
    ok = result["done"] == scenario.items and result["failed"] == 0
    targets = scenario.targets
    if "per_s" in targets:
        ok &= result["per_s"] >= targets["per_s"]
    if "max_429_pct" in targets:
        ok &= result["429_pct"] <= targets["max_429_pct"]
    if "min_tpm_pct" in targets:
        ok &= (result["tpm_used_pct"] or 0) >= targets["min_tpm_pct"]
    return "met" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[s.name for s in SCENARIOS])
    args = parser.parse_args()
    print(f"{'scenario':<11} {'items':>6} {'done':>6} {'failed':>6} {'wall s':>7} "
          f"{'items/s':>8} {'requests':>9} {'429s':>5} {'429 %':>6} {'tpm used %':>10} {'commit ms':>10}  target")
    for scenario in SCENARIOS:
        if args.only and scenario.name != args.only:
            continue
        result = measure(scenario)
        tpm = "-" if result["tpm_used_pct"] is None else f"{result['tpm_used_pct']:.1f}"
        print(f"{result['scenario']:<11} {result['items']:>6} {result['done']:>6} "
              f"{result['failed']:>6} {result['wall_s']:>7.1f} {result['per_s']:>8.1f} "
              f"{result['requests']:>9} {result['429s']:>5} {result['429_pct']:>6.2f} "
              f"{tpm:>10} {result['commit_ms']:>10}  {verdict(scenario, result)}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    raise SystemExit(main())
