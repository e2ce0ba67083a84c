"""Structured outputs and the Responses API at the issue's sizes, against `flow simulate`.

1. 500 items with a pydantic schema, the simulator breaking 10 % of replies: with
   `schema_retries: 1` every item done and valid, the re-asks paid and counted; with
   `schema_retries: 0` exactly the broken replies fail with `SchemaError`;
2. one classification pipeline over 1,000 items through `endpoint: chat` and
   `endpoint: responses`: the exports compared.

    python bench/outputs.py
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from simulator_process import simulator_process

MODEL = '''from typing import Literal
from pydantic import BaseModel


class Grade(BaseModel):
    grade: int
    reason: str
    level: Literal["low", "medium", "high"]
'''


def stats(root: str) -> dict[str, Any]:
    return dict(json.load(urllib.request.urlopen(root + "/sim/stats")))


def flow(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "flow", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def pipeline(folder: Path, base: str, rows: int, **call: Any) -> Path:
    with (folder / "rows.jsonl").open("w") as handle:
        for index in range(rows):
            handle.write(json.dumps({"id": f"r{index:05d}",
                                     "text": f"Review {index}: the phone works"}) + "\n")
    config = {"store": "flow.db", "load": {"path": "rows.jsonl", "id": "id"},
              "call": {"model": "gpt-4o-mini", "base_url": base, "api_key": "sk-bench",
                       "messages": [{"role": "user", "content": "{{ text }}"}],
                       "concurrency": 50, **call}}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def schema_runs() -> None:
    for retries in (1, 0):
        with simulator_process("--schema-break-rate", "0.1") as root, \
                tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "grades.py").write_text(MODEL)
            path = pipeline(folder, root + "/v1", 500, schema={"python": "grades:Grade"},
                            schema_retries=retries)
            code = flow("run", str(path))
            seen = stats(root)
            with sqlite3.connect(folder / "flow.db") as db:
                by_status = dict(db.execute("SELECT status || ' ' || COALESCE(error_class, ''), "
                                            "COUNT(*) FROM results GROUP BY 1").fetchall())
                replies, paid = db.execute("SELECT COUNT(*), SUM(cost_usd) "
                                           "FROM responses").fetchone()
                bought = db.execute("SELECT SUM(cost_usd) FROM results").fetchone()[0]
            print(f"schema_retries {retries}: exit {code}, {seen['requests']} requests, "
                  f"{seen['schema_broken']} replies broken by the simulator, results "
                  f"{by_status}, {replies} paid replies ${paid:.6f} (the results' own "
                  f"${bought:.6f})", flush=True)


def endpoint_runs() -> None:
    exports = {}
    with simulator_process() as root:
        for endpoint in ("chat", "responses"):
            with tempfile.TemporaryDirectory() as tmp:
                path = pipeline(Path(tmp), root + "/v1", 1000, endpoint=endpoint, messages=[
                    {"role": "system", "content": "Classify the review as positive, negative "
                     "or neutral. Reply with one word."},
                    {"role": "user", "content": "{{ text }}"}])
                assert flow("run", str(path)) == 0
                out = Path(tmp) / "out.jsonl"
                assert flow("export", str(path), "-o", str(out)) == 0
                exports[endpoint] = out.read_text()
    same = exports["chat"] == exports["responses"]
    print(f"1,000 items through chat and responses: exports {'identical' if same else 'DIFFER'}"
          f" ({len(exports['chat'].splitlines())} lines each)", flush=True)


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    schema_runs()
    endpoint_runs()
