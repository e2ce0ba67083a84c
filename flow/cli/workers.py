"""`flow plan` and `flow worker`, and `flow run` on a PostgreSQL store (the two in turn)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console

from flow.cli.codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from flow.config import PipelineConfig, load_config
from flow.config.store_url import store_url
from flow.errors import FlowError

if TYPE_CHECKING:
    from flow.plan import RunOptions
    from flow.progress import RunSummary
    from flow.workers.worker import WorkOptions


def plan_command(args: argparse.Namespace, err: Console) -> int:
    """`flow plan`: record the items and queue their requests; nothing is sent."""
    from flow.plan import RunOptions

    config = load_config(args.pipeline)
    store_url(config.store)
    options = RunOptions(simulate=args.simulate, retry_failed=args.retry_failed)
    _plan(config, options, err)
    return EXIT_OK


def _plan(config: PipelineConfig, options: RunOptions, err: Console) -> None:
    from flow.workers.planning import plan_pipeline

    summary = asyncio.run(plan_pipeline(config, options))
    p = summary.progress
    err.print(f"planned: {p.rows:,} rows read, {p.failed:,} failed to render, "
              f"{p.done:,} done before; {summary.queued:,} requests queued for workers "
              f"(store {summary.store})", markup=False, highlight=False)


def worker_command(args: argparse.Namespace, err: Console) -> int:
    """`flow worker`: claim and send queued requests until none is left."""
    from flow.plan import RunOptions
    from flow.workers.worker import WorkOptions

    config = load_config(args.pipeline)
    store_url(config.store)
    if args.processes > 1:
        return _processes(args, err)
    options = RunOptions(simulate=args.simulate, limit=args.limit)
    work = WorkOptions(lease_s=args.lease_s, wait_for_work=args.wait)
    return _work(config, options, work, args.simulate, err)


def run_shared(config: PipelineConfig, options: RunOptions, err: Console) -> int:
    """`flow run` on a PostgreSQL store: plan, then work in this process."""
    from flow.workers.worker import WorkOptions

    _plan(config, options, err)
    return _work(config, options, WorkOptions(), options.simulate, err)


def _work(config: PipelineConfig, options: RunOptions, work: WorkOptions, simulate: bool,
          err: Console) -> int:
    from flow.progress import summarize

    if simulate:
        err.print("[yellow]--simulate: replies come from flow's built-in simulator, not "
                  "from a model[/]")
    summary, refused = asyncio.run(_work_with_signals(config, options, work, simulate))
    err.print(summarize(summary), highlight=False, markup=False)
    if refused:
        err.print(f"{refused:,} results came after this worker's lease had passed to another "
                  "worker: refused as results (the other's stand), their replies kept as paid "
                  "attempts", markup=False)
    if summary.state == "interrupted":
        err.print("interrupted: start a worker again to go on", markup=False)
        return EXIT_INTERRUPTED
    if summary.state == "stopped":
        return EXIT_FAILED
    return EXIT_OK if summary.progress.failed == 0 else EXIT_FAILED


async def _work_with_signals(config: PipelineConfig, options: RunOptions, work: WorkOptions,
                             simulate: bool) -> tuple[RunSummary, int]:
    from flow.stopping import StopSignals
    from flow.workers.worker import Worker

    async def start() -> tuple[RunSummary, int]:
        worker = Worker(config, options, work)

        def overdue() -> None:
            os.write(2, b"\nstopped now: every result committed is kept; the leases of the "
                        b"rest run out and other workers take them\n")
            os._exit(EXIT_INTERRUPTED)

        with StopSignals(asyncio.get_running_loop(), worker.request_stop,
                         config.run_keys.drain_s, overdue):
            return await worker.execute(), worker.rejected

    if not simulate:
        return await start()
    from flow.simulator.config import SimulatorConfig
    from flow.simulator.serving import serve

    async with serve(SimulatorConfig()) as (url, _):
        options.base_url, options.api_key = url, "sk-simulated"
        return await start()


def _processes(args: argparse.Namespace, err: Console) -> int:
    """`--processes N`: N worker processes, each its own event loop and connection."""
    command = [sys.executable, "-m", "flow", "worker", str(args.pipeline),
               "--lease-s", str(args.lease_s)]
    command += ["--simulate"] * args.simulate + ["--wait"] * args.wait
    if args.limit:
        command += ["--limit", str(args.limit)]
    children = [subprocess.Popen(command) for _ in range(args.processes)]
    try:
        codes = [child.wait() for child in children]
    except KeyboardInterrupt:  # the children had the signal too: they stop on their own
        codes = [child.wait() for child in children]
    err.print(f"{args.processes} workers ended: exit codes {codes}", markup=False)
    if any(code == EXIT_INTERRUPTED for code in codes):
        return EXIT_INTERRUPTED
    if any(code not in (EXIT_OK, EXIT_FAILED) for code in codes):
        raise FlowError("a worker process failed; see its message above")
    return EXIT_FAILED if EXIT_FAILED in codes else EXIT_OK


def add_worker_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                        positive_int: Callable[[str], int]) -> None:
    """The `plan` and `worker` subcommands."""
    from pathlib import Path

    plan = commands.add_parser("plan", help="record the items and queue their requests in a "
                                            "PostgreSQL store, for workers (safe to re-run)")
    plan.add_argument("pipeline", type=Path)
    plan.add_argument("--simulate", action="store_true",
                      help="plan for workers that run with --simulate")
    plan.add_argument("--retry-failed", action="store_true",
                      help="queue failed items' requests again")
    plan.set_defaults(handler=plan_command)
    worker = commands.add_parser("worker", help="claim and send queued requests until none "
                                                "is left (a PostgreSQL store)")
    worker.add_argument("pipeline", type=Path)
    worker.add_argument("--processes", type=positive_int, default=1, metavar="N",
                        help="start N worker processes (default 1)")
    worker.add_argument("--simulate", action="store_true",
                        help="send to flow's built-in simulator (one per process)")
    worker.add_argument("--limit", type=positive_int, metavar="N",
                        help="send at most N requests, then stop")
    worker.add_argument("--lease-s", type=float, default=30.0, metavar="S",
                        help="a claimed request is this worker's for S seconds without a "
                             "heartbeat (default 30)")
    worker.add_argument("--wait", action="store_true",
                        help="with nothing left to do, wait for more rather than end")
    worker.set_defaults(handler=worker_command)
