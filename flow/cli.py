"""The command line: parse arguments, call one library function, print, pick the exit code.

Exit codes: 0 every item done; 1 the run finished but some items failed; 2 bad usage,
configuration or environment (including a key the endpoint refuses); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from flow import __version__
from flow.config import PipelineConfig, load_config
from flow.errors import FlowError
from flow.report import export_results, list_failures, render_json, show_item, store_status
from flow.simulator.options import add_simulator_options, positive_int, simulator_config

if TYPE_CHECKING:
    from flow.progress import RunProgress, RunSummary
    from flow.run import Run, RunOptions
    from flow.simulator.config import SimulatorConfig

# `run`, `simulate` and `--dry-run` import the openai SDK and aiohttp inside their handlers:
# the read commands (`status`, `export`, ...) start in a fraction of the time without them.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("run", "status", "export", "failures", "show", "browse", "simulate")
PLAIN_EVERY_S = 5.0
FAILURES_SHOWN = 50


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `flow` and `python -m flow`."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in COMMANDS and not args_list[0].startswith("-"):
        args_list.insert(0, "run")
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return int(args.handler(args, err))
    except FlowError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader (`| head`) went away: what it wanted was written; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flow", description="Run a YAML pipeline of prompts through an OpenAI-compatible "
        "API, checkpointed to SQLite. `flow PIPELINE` is short for `flow run PIPELINE`.")
    parser.add_argument("--version", action="version", version=f"flow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run (or resume) a pipeline")
    run.add_argument("pipeline", type=Path)
    run.add_argument("--simulate", action="store_true",
                     help="answer from flow's built-in simulator: no API key, no cost")
    run.add_argument("--limit", type=positive_int, metavar="N",
                     help="call at most N pending items (try a pipeline on a sample)")
    run.add_argument("--retry-failed", action="store_true",
                     help="call again only the items that failed")
    run.add_argument("--error-class", metavar="CLASS",
                     help="with --retry-failed: only failures of this class")
    run.add_argument("--take-over-store", action="store_true",
                     help="make a store another pipeline used this pipeline's own")
    run.add_argument("--dry-run", action="store_true",
                     help="show the first requests, count what is done and left, estimate "
                     "tokens and cost; call nothing")
    add_simulator_options(run, prefix="sim-")
    run.set_defaults(handler=_run)

    status = commands.add_parser("status", help="counts, tokens, cost and run history")
    status.add_argument("pipeline", type=Path)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    export = commands.add_parser("export", help="write results in input order")
    export.add_argument("pipeline", type=Path)
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.add_argument("--format", default="jsonl", choices=("jsonl", "csv"))
    export.add_argument("--only", choices=("done", "failed", "pending"))
    export.add_argument("--fields", help="comma-separated input fields to include")
    export.set_defaults(handler=_export)

    failures = commands.add_parser("failures", help="failed items and why")
    failures.add_argument("pipeline", type=Path)
    failures.add_argument("--error-class", metavar="CLASS")
    failures.add_argument("--limit", type=positive_int, metavar="N")
    failures.add_argument("--json", action="store_true")
    failures.set_defaults(handler=_failures)

    show = commands.add_parser("show", help="one item in full: input, request, response")
    show.add_argument("pipeline", type=Path)
    show.add_argument("item_id", metavar="ID")
    show.set_defaults(handler=_show)

    browse = commands.add_parser("browse", help="open the store in Datasette (flow[browse])")
    browse.add_argument("pipeline", type=Path)
    browse.add_argument("--host", default="127.0.0.1")
    browse.add_argument("--port", type=int, default=8001)
    browse.set_defaults(handler=_browse)

    simulate = commands.add_parser("simulate", help="serve the OpenAI-compatible simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8000)
    add_simulator_options(simulate, prefix="")
    simulate.set_defaults(handler=_simulate)
    return parser


def _run(args: argparse.Namespace, err: Console) -> int:
    if args.error_class and not args.retry_failed:
        raise FlowError("--error-class needs --retry-failed")
    from flow.run import RunOptions

    config = load_config(args.pipeline)
    options = RunOptions(simulate=args.simulate, limit=args.limit,
                         retry_failed=args.retry_failed, error_class=args.error_class,
                         take_over_store=args.take_over_store)
    if args.dry_run:
        return _dry_run(config, options)
    simulator = None
    if args.simulate:
        simulator = simulator_config(args, "sim_")
        err.print("[yellow]--simulate: replies come from flow's built-in simulator, "
                  "not from a model[/]")
    display = _Display(err)
    try:
        summary = asyncio.run(_run_with_signals(config, options, simulator, display, err))
    finally:
        display.close()
    from flow.progress import summarize

    err.print(summarize(summary), highlight=False, markup=False)
    if summary.state == "interrupted":
        err.print("interrupted: run the same command again to resume", markup=False)
        return EXIT_INTERRUPTED
    if summary.state == "stopped":
        return EXIT_FAILED
    return EXIT_OK if summary.progress.failed == 0 else EXIT_FAILED


def _dry_run(config: PipelineConfig, options: RunOptions) -> int:
    from flow.dryrun import dry_run
    from flow.plan import BATCH_ROWS
    from flow.prices import PRICES_TAKEN_ON

    report = asyncio.run(dry_run(config, options))
    out = Console(highlight=False, soft_wrap=True)
    for number, request in enumerate(report.samples, 1):
        out.print(f"request {number}:", style="bold")
        out.print(render_json(request), markup=False)
    for message in report.bad_samples:
        out.print(f"bad row: {message}", style="red", markup=False)
    cost = report.cost_usd
    price = ("unknown price for this model: set call.price" if cost is None
             else f"about ${cost:.4f} at list prices of {PRICES_TAKEN_ON}")
    out.print(f"dry run against {report.origin}: {report.rows:,} rows; "
              f"{report.done:,} already done, {report.to_call:,} to call"
              f"{f' ({report.shared:,} more items share those requests)' if report.shared else ''}, "
              f"{report.reposts:,} to post-process again, {report.failed_kept:,} failed with a "
              f"paid response (kept), {report.bad_rows:,} bad rows", markup=False)
    if report.stopped_at_row is not None:
        out.print(f"--limit {options.limit}: the run sends nothing from row "
                  f"{report.stopped_at_row} on, and reads no batch of {BATCH_ROWS:,} rows after "
                  "that row's; the rest is left for a later run", markup=False)
    out.print(f"estimate: {report.prompt_tokens:,} prompt tokens + up to "
              f"{report.completion_tokens:,} completion tokens ({report.model}), {price}; "
              "nothing was called", markup=False)
    return EXIT_OK


async def _run_with_signals(config: PipelineConfig, options: RunOptions,
                            simulator: SimulatorConfig | None, display: _Display,
                            err: Console) -> RunSummary:
    """The run, on the simulator when asked; Ctrl-C and SIGTERM ask it to stop."""
    from flow.run import Run

    if simulator is None:
        return await _signalled(Run(config, options, on_progress=display.update), err)
    from flow.simulator.serving import serve

    async with serve(simulator) as (url, _):
        options.base_url, options.api_key = url, "sk-simulated"
        return await _signalled(Run(config, options, on_progress=display.update), err)


async def _signalled(run: Run, err: Console) -> RunSummary:
    from flow.stopping import StopSignals

    def on_signal() -> None:
        first = run.progress.stopping is None
        run.request_stop()
        if first:
            err.print(f"\nstopping: finishing {run.progress.in_flight} requests in flight "
                      f"(up to {run.config.call.drain_s:g} s); press Ctrl-C again to stop now",
                      markup=False)

    def on_overdue() -> None:
        # from a watchdog thread, while something holds the event loop: end the process as
        # kill -9 would; every result committed stays, the next run goes on from there
        os.write(2, b"\nstopped now: every result committed is kept; run the same command "
                    b"again to resume\n")
        os._exit(EXIT_INTERRUPTED)

    loop = asyncio.get_running_loop()
    with StopSignals(loop, on_signal, run.config.call.drain_s, on_overdue):
        return await run.execute()


class _Display:
    """A live panel on a terminal; a plain line every few seconds elsewhere."""

    def __init__(self, err: Console) -> None:
        self._err = err
        self._live: Live | None = None
        self._last_line = 0.0
        self._progress: RunProgress | None = None
        if err.is_terminal:
            self._live = Live(console=err, refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, progress: RunProgress) -> None:
        from flow.progress import describe, render

        self._progress = progress
        if self._live is not None:
            self._live.update(render(progress))
        elif time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._last_line = time.monotonic()
            self._err.print(describe(progress), markup=False, highlight=False)

    def close(self) -> None:
        from flow.progress import render

        if self._live is not None:
            if self._progress is not None:
                self._live.update(render(self._progress))
            self._live.stop()


def _status(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    status = store_status(config.store)
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    out = Console(highlight=False)
    out.print(f"store {status['store']}: {status['items']:,} items")
    table = Table(show_header=True, header_style="bold")
    table.add_column("status")
    table.add_column("items", justify="right")
    for name in ("done", "failed", "pending"):
        table.add_row(name, f"{status[name]:,}")
    out.print(table)
    if status["failed_by_error_class"]:
        errors = Table("error class", "items", header_style="bold")
        for name, count in status["failed_by_error_class"].items():
            errors.add_row(str(name), f"{count:,}")
        out.print(errors)
    tokens = status["tokens"]
    out.print(f"tokens {tokens['prompt']:,} in / {tokens['completion']:,} out, "
              f"cost ${status['cost_usd']:.4f} for {status['replies_paid']:,} paid replies, "
              f"{status['attempts']:,} attempts")
    other = status["cost_usd"] - status["cost_of_results_usd"]
    if round(other, 4):
        out.print(f"  ${status['cost_of_results_usd']:.4f} bought the current results; "
                  f"${other:.4f} paid for requests no item makes any more "
                  "(an edited template, a reply bought again)")
    runs = Table("run", "started", "finished", "state", "done", "failed", "skipped", "calls",
                 "cost", header_style="bold")
    for run in status["runs"][-10:]:
        runs.add_row(str(run["id"]), _when(run["started_at"]), _when(run["finished_at"]),
                     run["state"],
                     f"{run['items_done']:,}", f"{run['items_failed']:,}",
                     f"{run['items_skipped']:,}", f"{run['calls_made']:,}",
                     f"${run['cost_usd'] or 0:.4f}")
    out.print(runs)
    return EXIT_OK


def _when(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else "-"


def _export(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    count = export_results(config.store, args.output, sys.stdout, args.format, args.only, fields)
    if args.output is not None:
        err.print(f"wrote {count:,} items to {args.output}", markup=False)
    return EXIT_OK


def _failures(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    if args.json:
        failures = list_failures(config.store, args.error_class, args.limit)
        print(json.dumps(failures, indent=2, ensure_ascii=False))
        return EXIT_OK
    shown = args.limit or FAILURES_SHOWN
    failures = list_failures(config.store, args.error_class, shown + 1)
    if not failures:
        err.print("no failed items", markup=False)
        return EXIT_OK
    table = Table("id", "row", "error class", "attempts", "error", header_style="bold")
    for failure in failures[:shown]:
        table.add_row(str(failure["id"]), str(failure["row"]), str(failure["error_class"]),
                      str(failure["attempts"] or 0), str(failure["error"]))
    Console(highlight=False).print(table)
    if len(failures) > shown and not args.limit:
        err.print(f"showing the first {shown}; --limit N for more, --json for all, or "
                  "`flow export --only failed`", markup=False)
    return EXIT_OK


def _show(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    print(render_json(show_item(config.store, args.item_id)))
    return EXIT_OK


def _browse(args: argparse.Namespace, err: Console) -> int:
    from flow.browse import serve_store

    config = load_config(args.pipeline)
    try:
        code = serve_store(config.store, config.file, args.host, args.port, lambda url: err.print(
            f"Datasette on {config.store}: {url} (Ctrl-C to stop)", markup=False))
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK if code == 0 else EXIT_USAGE


def _simulate(args: argparse.Namespace, err: Console) -> int:
    from flow.simulator.serving import serve

    config = simulator_config(args, "")

    async def serve_forever() -> None:
        try:
            async with serve(config, port=args.port, host=args.host) as (url, _):
                err.print(f"simulator listening on {url} (Ctrl-C to stop)", markup=False)
                await asyncio.Event().wait()
        except OSError as e:
            raise FlowError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    try:
        asyncio.run(serve_forever())
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK
