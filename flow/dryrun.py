"""A dry run: what a run would send and what it would cost, calling nothing, writing nothing.

Every row is read and rendered as a run would; the store (if any) is only read, so a dry run
works beside a live run. Prompt tokens are counted exactly with the model's tokenizer;
completion tokens are the same estimate the rate limiter reserves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flow.call import endpoint_origin
from flow.config import PipelineConfig
from flow.errors import TemplateError
from flow.load import read_rows
from flow.post import PostProcessor
from flow.prices import Price, cost_usd, price_for
from flow.request import RequestBuilder, content_key
from flow.run import BATCH_ROWS, RunOptions, decide
from flow.store import KnownCall, Store
from flow.tokens import count_prompt_tokens, expected_output_tokens

SAMPLES = 3


@dataclass
class DryRunReport:
    """What a run would do."""

    rows: int = 0
    to_call: int = 0
    done: int = 0
    failed_kept: int = 0
    reposts: int = 0
    bad_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price: Price | None = None
    model: str = ""
    origin: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)
    bad_samples: list[str] = field(default_factory=list)

    @property
    def cost_usd(self) -> float | None:
        """Estimated dollars for the calls to be made."""
        return cost_usd(self.price, self.prompt_tokens, self.completion_tokens)


async def dry_run(config: PipelineConfig, options: RunOptions) -> DryRunReport:
    """Render every row, look up what is done, and estimate what is left."""
    builder = RequestBuilder(config.call)
    post_key = PostProcessor(config.post, config.file.parent).fingerprint
    report = DryRunReport(model=config.call.model,
                          price=price_for(config.call.model, config.call.price),
                          origin=endpoint_origin(config.call.base_url, options.simulate))
    output_tokens = expected_output_tokens(config.call.params, config.call.expected_output_tokens)
    store = await Store.open_read_only(config.store) if config.store.exists() else None
    try:
        batch: list[tuple[str, dict[str, Any]]] = []
        for row in read_rows(config.load):
            report.rows += 1
            if row.error is not None or row.fields is None:
                _bad(report, str(row.error))
                continue
            try:
                request = builder.build(row.fields, f"{config.load.path.name} row {row.number}")
            except TemplateError as e:
                _bad(report, str(e))
                continue
            batch.append((content_key(request), request))
            if len(batch) >= BATCH_ROWS:
                await _tally(report, batch, store, options, post_key, output_tokens)
                batch = []
        await _tally(report, batch, store, options, post_key, output_tokens)
    finally:
        if store is not None:
            await store.close()
    return report


def _bad(report: DryRunReport, message: str) -> None:
    report.bad_rows += 1
    if len(report.bad_samples) < SAMPLES:
        report.bad_samples.append(message)


async def _tally(report: DryRunReport, batch: list[tuple[str, dict[str, Any]]],
                 store: Store | None, options: RunOptions, post_key: str,
                 output_tokens: int) -> None:
    known: dict[str, KnownCall] = {}
    if store is not None and batch:
        known = await store.known_calls(report.origin, [key for key, _ in batch])
    for key, request in batch:
        action = decide(known.get(key), post_key, options.retry_failed, options.error_class)
        if action == "call":
            if options.limit is not None and report.to_call >= options.limit:
                continue
            report.to_call += 1
            report.prompt_tokens += count_prompt_tokens(request["messages"], request["model"])
            report.completion_tokens += output_tokens
            if len(report.samples) < SAMPLES:
                report.samples.append(request)
        elif action == "skip-done":
            report.done += 1
        elif action == "skip-failed":
            report.failed_kept += 1
        elif action == "repost":
            report.reposts += 1
