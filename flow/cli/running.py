"""`flow run`: the run with its live display and its stop signals, or the dry run."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live

from flow.cli.codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from flow.config import PipelineConfig, is_postgres, load_config
from flow.errors import FlowError
from flow.report import render_json
from flow.simulator.options import simulator_config

if TYPE_CHECKING:
    from flow.progress import RunProgress, RunSummary
    from flow.run import Run, RunOptions
    from flow.simulator.config import SimulatorConfig

PLAIN_EVERY_S = 5.0


def run_command(args: argparse.Namespace, err: Console) -> int:
    if args.error_class and not args.retry_failed:
        raise FlowError("--error-class needs --retry-failed")
    from flow.run import RunOptions

    config = load_config(args.pipeline)
    if args.detach and args.simulate:
        raise FlowError("--detach with --simulate: the simulator ends with this run, and the "
                        "batches it holds with it; run without --detach (a simulated batch "
                        "takes seconds), or detach from a real endpoint")
    if args.stage and not args.retry_failed:
        raise FlowError("--stage needs --retry-failed")
    options = RunOptions(simulate=args.simulate, limit=args.limit,
                         retry_failed=args.retry_failed, error_class=args.error_class,
                         take_over_store=args.take_over_store, recall=args.recall,
                         stage=args.stage, detach=args.detach)
    if args.dry_run:
        return _dry_run(config, options)
    if is_postgres(config.store):
        from flow.cli.workers import run_shared

        return run_shared(config, options, err)
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
    if summary.state == "detached":
        return EXIT_OK
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
    chained = len(report.stages) > 1
    if chained:
        out.print(f"dry run against {report.origin}: {report.rows:,} rows, "
                  f"{report.bad_rows:,} bad rows", markup=False)
    for stage in report.stages:
        shared = f" ({stage.shared:,} more items share those requests)" if stage.shared else ""
        if stage.per_request > 1 and stage.to_call:
            shared += (f", packed into {-(-stage.to_call // stage.per_request):,} requests of "
                       f"up to {stage.per_request:,} inputs")
        unknown = (f", {stage.unknown:,} of them after an earlier stage's call (at most)"
                   if stage.unknown else "")
        skipped = f", {stage.skipped:,} skipped by when:" if stage.skipped else ""
        counts = (f"{stage.done:,} already done, {stage.to_call:,} to call{shared}{unknown}, "
                  f"{stage.reposts:,} to post-process again, {stage.failed_kept:,} failed with "
                  f"a paid response (kept){skipped}")
        cost = stage.cost_usd
        price = ("unknown price for this model: set price:" if cost is None
                 else f"about ${cost:.4f} at list prices of {PRICES_TAKEN_ON}")
        tokens = (f"{stage.prompt_tokens:,} prompt tokens + up to {stage.completion_tokens:,} "
                  f"completion tokens ({stage.model}), {price}")
        if chained:
            out.print(f"stage {stage.name}: {counts}", markup=False)
            out.print(f"stage {stage.name} estimate: {tokens}", markup=False)
        else:
            out.print(f"dry run against {report.origin}: {report.rows:,} rows; {counts}, "
                      f"{report.bad_rows:,} bad rows", markup=False)
    if report.stopped_at_row is not None:
        out.print(f"--limit {options.limit}: the run sends nothing from row "
                  f"{report.stopped_at_row} on, and reads no batch of {BATCH_ROWS:,} rows after "
                  "that row's; the rest is left for a later run", markup=False)
    if chained:
        total = report.cost_usd
        out.print("estimate for every stage: "
                  + ("unknown (a model's price is not known)" if total is None
                     else f"about ${total:.4f}") + "; nothing was called", markup=False)
    else:
        out.print(f"estimate: {tokens}; nothing was called", markup=False)
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
                      f"(up to {run.config.run_keys.drain_s:g} s); press Ctrl-C again to stop now",
                      markup=False)

    def on_overdue() -> None:
        # from a watchdog thread, while something holds the event loop: end the process as
        # kill -9 would; every result committed stays, the next run goes on from there
        os.write(2, b"\nstopped now: every result committed is kept; run the same command "
                    b"again to resume\n")
        os._exit(EXIT_INTERRUPTED)

    loop = asyncio.get_running_loop()
    with StopSignals(loop, on_signal, run.config.run_keys.drain_s, on_overdue):
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


def cancel_command(args: argparse.Namespace, err: Console) -> int:
    """`flow cancel`: ask the provider to cancel the pipeline's open batches."""
    from flow.endpoints import SIMULATED_ORIGIN
    from flow.execute.batch_cancel import cancel_batches
    from flow.execute.client import make_client

    config = load_config(args.pipeline)
    keys = config.run_keys
    base_url = args.sim_url if args.simulate else keys.base_url
    if args.simulate and not base_url:
        raise FlowError("--simulate: the simulator that holds the batches is gone with the "
                        f"run that started it; its batches end with it ({SIMULATED_ORIGIN})")
    api_key = keys.api_key or os.environ.get("OPENAI_API_KEY") or (
        "sk-simulated" if args.simulate else None)
    if not api_key:
        raise FlowError(f"{config.file}: no API key: set OPENAI_API_KEY or call.api_key")

    async def cancel() -> list[Any]:
        client = make_client(keys, base_url, api_key)
        try:
            return await cancel_batches(config.store, client)
        finally:
            await client.close()

    cancelled = asyncio.run(cancel())
    if not cancelled:
        err.print("no open batch to cancel", markup=False)
    for batch in cancelled:
        err.print(f"batch {batch.batch_id} (shard {batch.shard}, stage {batch.stage}): "
                  f"{batch.status}", markup=False)
    if cancelled:
        err.print("run the pipeline again to collect what they finished; the rest is sent "
                  "again", markup=False)
    return EXIT_OK
