"""Does `flow browse` show a person the results? Checked in a real headless Chromium.

Runs a small review-labelling pipeline on flow's simulator (`flow run --simulate`: no key,
no cost; one review gets a 400, one a reply withheld by the content filter), starts `flow browse` on its store,
loads the `browse` view in headless Chromium and reads the page it rendered: the rows in
input order (not id order), the input fields in columns of their own, the outputs as plain
text (no JSON quotes), every cost rounded to 6 places, and facets on status and error class.
Then it saves a screenshot of the page.

    python bench/browse_check.py [--screenshot docs/browse.png] [--browser PATH]

Exit 0 when the page shows all that, 1 with what is wrong, 2 when there is no Chromium or
no Datasette (`pip install 'flow[browse]'`; Chromium from the system's packages).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WINDOW = "1500,1120"
START_WITHIN_S = 30.0
REVIEWS = [  # input order on purpose unlike id order
    {"id": "r-104", "text": "Arrived quickly and works perfectly.", "stars": 5},
    {"id": "r-017", "text": "The strap broke after two days.", "stars": 1},
    {"id": "r-233", "text": "It does what it says.", "stars": 3},
    {"id": "r-051", "text": "[sim:status=400] Not a review at all.", "stars": 2},
    {"id": "r-009", "text": "Great value; I bought a second one.", "stars": 5},
    {"id": "r-310", "text": "[sim:finish=content_filter] A review withheld.", "stars": 4},
    {"id": "r-122", "text": "Smaller than the pictures suggest.", "stars": 2},
    {"id": "r-078", "text": "The battery lasts all week.", "stars": 4},
]
PIPELINE = """\
store: reviews.db
load: {path: reviews.jsonl, id: id}
call:
  model: gpt-4o-mini
  messages:
    - role: user
      content: "Label this review positive, negative or neutral: {{ text }}"
  concurrency: 4
post: [strip, lower]
"""


class Cells(HTMLParser):
    """The table Datasette rendered: its column names and each row's cells by column."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.facets: list[str] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        classes = (found.get("class") or "").split()
        if tag == "th" and found.get("data-column"):
            self.columns.append(str(found["data-column"]))
        elif tag == "tr" and self.columns:
            self.rows.append({})
        elif tag == "td" and self.rows:
            self._cell = next((c[4:] for c in classes if c.startswith("col-")), None)
            if self._cell is not None:
                self.rows[-1][self._cell] = ""
        elif tag == "div" and "facet-info" in classes and found.get("data-column"):
            self.facets.append(str(found["data-column"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None and self.rows:
            self.rows[-1][self._cell] += data


def find_browser(given: str | None) -> str | None:
    """The Chromium to drive: the one given, or the first on PATH."""
    if given:
        return shutil.which(given) or (given if Path(given).exists() else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def chromium(browser: str, *args: str) -> str:
    """Run headless Chromium with `args`; what it printed."""
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", f"--window-size={WINDOW}", *args],
        capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_WITHIN_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"flow browse exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"flow browse did not answer at {url} within {START_WITHIN_S:g} s")


def printed_url(server: subprocess.Popen[str]) -> str:
    """The address `flow browse` prints first: `Datasette on STORE: URL (Ctrl-C to stop)`."""
    assert server.stdout is not None
    line = server.stdout.readline()
    if "(Ctrl-C to stop)" not in line:
        raise SystemExit(f"flow browse said {line!r}")
    return line.rsplit(" (Ctrl-C", 1)[0].rsplit(" ", 1)[1]


def expected(store: Path) -> list[tuple[str, str | None, float]]:
    """(item id, output as plain text, cost) per item in input order, from `results`."""
    with sqlite3.connect(store) as db:
        return db.execute("SELECT item_id, output_text, cost_usd FROM results "
                          "ORDER BY row").fetchall()


def check_page(page: Cells, store: Path) -> list[str]:
    """What the rendered page gets wrong; empty when it shows what it should."""
    problems = []
    if page.columns[:5] != ["row", "item_id", "text", "stars", "output"]:
        problems.append(f"columns start {page.columns[:5]}, not row, item_id and the fields")
    if "input" in page.columns:
        problems.append("the input's JSON is shown beside its fields")
    want = expected(store)
    if [row.get("item_id") for row in page.rows] != [item_id for item_id, _, _ in want]:
        problems.append(f"rows not in input order: {[r.get('item_id') for r in page.rows]}")
    for row, review in zip(page.rows, REVIEWS):
        if row.get("text") != review["text"] or row.get("stars") != str(review["stars"]):
            problems.append(f"{review['id']}: input fields shown as {row}")
    for row, (item_id, text, cost) in zip(page.rows, want):
        if text is not None and row.get("output") != text:
            problems.append(f"{item_id}: output {row.get('output')!r}, expected {text!r}")
        shown = row.get("cost_usd", "").strip()
        if cost and (not shown or float(shown) != round(cost, 6) or len(shown) > 12):
            problems.append(f"{item_id}: cost shown {shown!r} for {cost!r}")
    labels = {row.get("output") for row in page.rows if row.get("status") == "done"}
    if not labels or not labels <= {"positive", "negative", "neutral"}:
        problems.append(f"outputs are not plain labels: {labels}")
    if sorted(row.get("error_class") for row in page.rows if row.get("status") == "failed") \
            != ["BadRequestError", "ResponseError"]:
        problems.append("the two failures are not shown with their error class")
    if not {"status", "error_class"} <= set(page.facets):
        problems.append(f"facets shown: {page.facets}, not status and error_class")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshot", type=Path, default=Path("browse.png"))
    parser.add_argument("--browser", help="the Chromium binary (default: the first on PATH)")
    args = parser.parse_args()
    browser = find_browser(args.browser)
    if browser is None:
        print(f"no headless browser found ({', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    if importlib.util.find_spec("datasette") is None:
        print("no Datasette: pip install 'flow[browse]'", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's flow, wherever run
    with tempfile.TemporaryDirectory(prefix="flow-browse-check-") as folder:
        work = Path(folder)
        (work / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
        (work / "pipeline.yaml").write_text(PIPELINE)
        run = subprocess.run([sys.executable, "-m", "flow", "run", "pipeline.yaml",
                              "--simulate"], cwd=work, env=env, capture_output=True, text=True)
        if run.returncode != 1:  # two reviews fail on purpose
            print(f"flow run exited {run.returncode}: {run.stderr}", file=sys.stderr)
            return 1
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "flow", "browse", "pipeline.yaml", "--port", str(port)],
            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = printed_url(server)  # the address a person is given
            wait_until_up(f"http://127.0.0.1:{port}/-/versions.json", server)
            page = Cells()
            page.feed(chromium(browser, "--dump-dom", url))
            problems = check_page(page, work / "reviews.db")
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            chromium(browser, f"--screenshot={args.screenshot.resolve()}", url)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.communicate()
    for problem in problems:
        print(f"wrong: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: {len(page.rows)} rows in input order, fields {page.columns[2:4]}, plain "
              f"outputs, rounded costs, facets {page.facets}; screenshot {args.screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
