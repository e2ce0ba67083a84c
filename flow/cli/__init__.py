"""The command line: parse arguments, call one library function, print, pick the exit code.

Exit codes: 0 every item done; 1 the run finished but some items failed; 2 bad usage,
configuration or environment (including a key the endpoint refuses); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from flow import __version__
from flow.cli.codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from flow.cli.inspect import (
    browse_command,
    export_command,
    failures_command,
    show_command,
    status_command,
)
from flow.cli.running import cancel_command, run_command
from flow.cli.workers import add_worker_commands
from flow.errors import FlowError
from flow.open_files import is_out_of_files, out_of_files_hint
from flow.simulator.options import add_simulator_options, positive_int, simulator_config

# `run`, `simulate` and `--dry-run` import the openai SDK and aiohttp inside their handlers:
# the read commands (`status`, `export`, ...) start in a fraction of the time without them.

COMMANDS = ("run", "plan", "worker", "status", "export", "failures", "show", "browse", "cancel",
            "simulate")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `flow` and `python -m flow`."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in COMMANDS and not args_list[0].startswith("-"):
        close = difflib.get_close_matches(args_list[0], COMMANDS, n=1)
        if close and not Path(args_list[0]).exists():
            print(f"flow: unknown command '{args_list[0]}'; did you mean '{close[0]}'?",
                  file=sys.stderr)
            return EXIT_USAGE
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
    except OSError as e:
        # anywhere else a file is opened (a module imported late): the same clear words
        if not is_out_of_files(e):
            raise
        err.print(f"[bold red]error:[/] {out_of_files_hint()}", markup=True, soft_wrap=True)
        return EXIT_USAGE


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
    run.add_argument("--recall", action="store_true",
                     help="with --retry-failed: buy replies again for post-step failures too")
    run.add_argument("--stage", metavar="NAME",
                     help="with --retry-failed: only the failures of this stage")
    run.add_argument("--detach", action="store_true",
                     help="batch stages: submit the batches and exit; run again to collect")
    run.add_argument("--take-over-store", action="store_true",
                     help="make a store another pipeline used this pipeline's own")
    run.add_argument("--dry-run", action="store_true",
                     help="show the first requests, count what is done and left, estimate "
                     "tokens and cost; call nothing")
    add_simulator_options(run, prefix="sim-")
    run.set_defaults(handler=run_command)

    add_worker_commands(commands, positive_int)

    status = commands.add_parser("status", help="counts, tokens, cost and run history")
    status.add_argument("pipeline", type=Path)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=status_command)

    export = commands.add_parser("export", help="write results in input order")
    export.add_argument("pipeline", type=Path)
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.add_argument("--format", choices=("jsonl", "csv", "parquet"),
                        help="default: the one -o's suffix names, else jsonl")
    export.add_argument("--only", choices=("done", "failed", "pending", "skipped"),
                        help="only the items of this status (at the stage exported)")
    export.add_argument("--fields", help="comma-separated input fields to include "
                                         "(default: all of them), or a stage's output: "
                                         "answer.output, grade.output.<key>")
    export.add_argument("--stage", metavar="NAME",
                        help="export this stage's results (default: the last stage's)")
    export.add_argument("--no-input", action="store_true", help="leave the input fields out")
    export.add_argument("--flatten", action="store_true",
                        help="a column for each key of the stage's output objects")
    export.set_defaults(handler=export_command)

    failures = commands.add_parser("failures", help="failed items and why")
    failures.add_argument("pipeline", type=Path)
    failures.add_argument("--error-class", metavar="CLASS",
                          help="only failures of this class (as `flow status` lists them)")
    failures.add_argument("--limit", type=positive_int, metavar="N",
                          help="show the first N failures, in input order")
    failures.add_argument("--stage", metavar="NAME", help="only the failures of this stage")
    failures.add_argument("--json", action="store_true", help="machine-readable output")
    failures.set_defaults(handler=failures_command)

    show = commands.add_parser("show", help="one item in full: input, request, response")
    show.add_argument("pipeline", type=Path)
    show.add_argument("item_id", metavar="ID")
    show.set_defaults(handler=show_command)

    browse = commands.add_parser("browse", help="open the store in Datasette (flow[browse])")
    browse.add_argument("pipeline", type=Path)
    browse.add_argument("--host", default="127.0.0.1")
    browse.add_argument("--port", type=int, default=8001)
    browse.set_defaults(handler=browse_command)

    cancel = commands.add_parser("cancel", help="cancel the pipeline's open batches "
                                                "(their finished lines are kept)")
    cancel.add_argument("pipeline", type=Path)
    cancel.add_argument("--simulate", action="store_true",
                        help="the batches were sent to flow's simulator (with --sim-url)")
    cancel.add_argument("--sim-url", help=argparse.SUPPRESS)
    cancel.set_defaults(handler=cancel_command)

    simulate = commands.add_parser("simulate", help="serve the OpenAI-compatible simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8000)
    add_simulator_options(simulate, prefix="")
    simulate.set_defaults(handler=_simulate)
    return parser


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
