"""The read-only commands: `status`, `export`, `failures`, `show`, `browse`."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from flow.cli.codes import EXIT_OK, EXIT_USAGE
from flow.config import PipelineConfig, load_config
from flow.config.store_url import StoreURL, sqlite_path
from flow.endpoints import SIMULATED_ORIGIN
from flow.errors import ConfigError, SourceError
from flow.export import export_results
from flow.load import count_rows
from flow.report import list_failures, render_json, show_item, store_status

FAILURES_SHOWN = 50


def status_command(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    status = store_status(config.store, _stage_names(config))
    try:
        # rows no run has read yet are pending too (at every stage): counted from the input,
        # as a run does
        status["input_rows"] = count_rows(config.load)
        status["not_read"] = max(0, status["input_rows"] - status["items"])
        status["pending"] += status["not_read"]
        for stage in status.get("stages", []):
            stage["pending"] += status["not_read"]
    except SourceError:
        status["input_rows"] = status["not_read"] = None
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    out = Console(highlight=False)
    out.print(f"store {status['store']}: {status['items']:,} items")
    if status["not_read"]:
        out.print(f"input {config.load.path.name}: {status['input_rows']:,} rows; "
                  f"{status['not_read']:,} not read by any run yet (counted as pending)")
    simulated = status["done_by_origin"].get(SIMULATED_ORIGIN, 0)
    if simulated:
        out.print(f"{simulated:,} done items came from flow's simulator (--simulate), not from "
                  "a model; a run without --simulate calls the endpoint for them")
    table = Table(show_header=True, header_style="bold")
    table.add_column("status")
    table.add_column("items", justify="right")
    for name in ("done", "failed", "pending", "skipped"):
        if name in status:
            table.add_row(name, f"{status[name]:,}")
    out.print(table)
    if "stages" in status:
        stages = Table("stage", header_style="bold")
        for name in ("done", "failed", "skipped", "pending", "tokens in", "tokens out", "cost"):
            stages.add_column(name, justify="right")
        for stage in status["stages"]:
            stages.add_row(stage["stage"], *(f"{stage[key]:,}" for key in (
                "done", "failed", "skipped", "pending", "prompt_tokens", "completion_tokens")),
                           f"${stage['cost_usd']:.4f}")
        out.print(stages)
    if status["truncated"]:
        out.print(f"{status['truncated']:,} outputs come from replies cut short at max_tokens "
                  "(flagged `truncated`; call.on_truncated: fail fails them)")
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
    if status.get("batches"):
        batches = Table("batch", "stage", "state", "provider", "lines", "done", "failed",
                        "age", "cost", header_style="bold")
        for batch in status["batches"][-20:]:
            batches.add_row(str(batch["shard"]), batch["stage"], batch["state"],
                            f"{batch['status'] or '-'} {batch['batch_id'] or ''}".strip(),
                            f"{batch['lines']:,}", f"{batch['completed']:,}",
                            f"{batch['failed']:,}", _age(batch["created_at"]),
                            f"${batch['cost_usd']:.4f}")
        out.print(batches)
    if "queue" in status:
        queue = status["queue"]
        out.print(f"queue: {queue['pending']:,} pending, {queue['leased']:,} leased, "
                  f"{queue['lease_expired']:,} with an expired lease (taken by the next "
                  f"claim), {queue['done']:,} done")
        for stage in queue.get("stages", []):
            out.print(f"  {stage['stage']}: {stage['pending']:,} pending, "
                      f"{stage['leased']:,} leased, {stage['lease_expired']:,} expired, "
                      f"{stage['done']:,} done", markup=False, highlight=False)
        workers = Table("worker", "run", "items", "items/s", "leases", "heartbeat",
                        header_style="bold")
        for worker in status["workers"]:
            beat = worker["heartbeat_s_ago"]
            workers.add_row(worker["worker"], str(worker["run"]), f"{worker['items']:,}",
                            f"{worker['items_per_s']:,}", f"{worker['leases']:,}",
                            "-" if beat is None else f"{beat:g} s ago")
        if status["workers"]:
            out.print(workers)
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


def _age(stamp: str) -> str:
    """How long ago a time the store wrote was: `3h12m`, `4m`."""
    from datetime import UTC, datetime

    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                   ).total_seconds()
    except ValueError:
        return "-"
    hours, minutes = divmod(int(seconds) // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def _when(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else "-"


def _stage_names(config: PipelineConfig) -> list[str]:
    return [stage.name for stage in config.chain]


def export_command(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    count = export_results(config.store, args.output, sys.stdout, args.format, args.only, fields,
                           with_input=not args.no_input, id_field=config.load.id,
                           stages=_stage_names(config), stage=args.stage,
                           flatten=args.flatten)
    if args.output is not None:
        err.print(f"wrote {count:,} items to {args.output}", markup=False)
    return EXIT_OK


def failures_command(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    stages = _stage_names(config)
    if args.json:
        failures = list_failures(config.store, args.error_class, args.limit, stages, args.stage)
        print(json.dumps(failures, indent=2, ensure_ascii=False))
        return EXIT_OK
    shown = args.limit or FAILURES_SHOWN
    failures = list_failures(config.store, args.error_class, shown + 1, stages, args.stage)
    if not failures:
        err.print("no failed items", markup=False)
        return EXIT_OK
    chained = len(stages) > 1
    table = Table("id", *(("stage",) if chained else ()), "row", "error class", "attempts",
                  "error", header_style="bold")
    for failure in failures[:shown]:
        table.add_row(str(failure["id"]), *((failure["stage"],) if chained else ()),
                      str(failure["row"]), str(failure["error_class"]),
                      str(failure["attempts"] or 0), str(failure["error"]))
    Console(highlight=False).print(table)
    if len(failures) > shown and not args.limit:
        err.print(f"showing the first {shown}; --limit N for more, --json for all, or "
                  "`flow export --only failed`", markup=False)
    return EXIT_OK


def show_command(args: argparse.Namespace, err: Console) -> int:
    config = load_config(args.pipeline)
    print(render_json(show_item(config.store, args.item_id, _stage_names(config))))
    return EXIT_OK


def browse_command(args: argparse.Namespace, err: Console) -> int:
    from flow.browse import serve_store

    config = load_config(args.pipeline)
    if isinstance(config.store, StoreURL):
        raise ConfigError(
            f"{config.file}: store: {config.store} is a PostgreSQL store; flow browse serves "
            "Datasette, which reads SQLite only. The store's `browse` view holds the same "
            "table: open it with psql or any PostgreSQL client (SELECT * FROM browse), or "
            "write it out with `flow export`")
    try:
        code = serve_store(sqlite_path(config.store, "flow browse"), config.file, args.host, args.port, lambda url: err.print(
            f"Datasette on {config.store}: {url} (Ctrl-C to stop)", markup=False),
            [stage.name for stage in config.chain])
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK if code == 0 else EXIT_USAGE
