"""A dry run: what a run would send and what it would cost, calling nothing, writing nothing.

Every row is read, rendered and planned as a run would (`flow.plan`); the store (if any) is
only read, so a dry run works beside a live run. Prompt tokens are counted exactly with the
model's tokenizer; completion tokens are the same estimate the rate limiter reserves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flow.config import PipelineConfig
from flow.endpoints import endpoint_origin, same_origin
from flow.endpoints.chat import estimate_prompt_tokens
from flow.errors import ItemError
from flow.load import read_rows
from flow.plan import Action, Planned, batches, decide, prepare
from flow.post import PostProcessor
from flow.prices import Price, cost_usd, price_for
from flow.records import STAGE
from flow.render import RequestBuilder
from flow.store import Store, open_store_read_only
from flow.tokens import expected_output_tokens

if TYPE_CHECKING:
    from flow.run import RunOptions

SAMPLES = 3


@dataclass
class DryRunReport:
    """What a run would do."""

    rows: int = 0
    to_call: int = 0
    shared: int = 0
    done: int = 0
    failed_kept: int = 0
    reposts: int = 0
    bad_rows: int = 0
    stopped_at_row: int | None = None  # --limit: where the run stops reading
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
    builder = RequestBuilder(config.call, f"{config.file}: ", config.step_timeout_s)
    post_key = PostProcessor(config.post, config.file.parent, config.step_timeout_s,
                                   config.call.on_truncated).fingerprint
    report = DryRunReport(model=config.call.model,
                          price=price_for(config.call.model, config.call.price),
                          origin=endpoint_origin(config.call.base_url, options.simulate,
                                                 f"{config.file}: ", config.call.endpoint_id))
    output_tokens = expected_output_tokens(config.call.params, config.call.expected_output_tokens)
    store = await open_store_read_only(config.store) if config.store.exists() else None
    if store is not None:
        report.origin = same_origin(report.origin, await store.origins())
    source = config.load.path.name
    seen = _Seen()
    try:
        for batch in batches(read_rows(config.load)):
            if report.stopped_at_row is not None:
                break  # --limit: the run reads no batch after the one where it stops
            await _tally(report, prepare(batch, builder, source), store, options, post_key,
                         output_tokens, seen)
    finally:
        if store is not None:
            await store.close()
    return report


@dataclass
class _Seen:
    """What the dry run has met so far: item ids (a repeated one fails its row, as in a run)
    and the requests it would send (a repeated one is shared, not sent again)."""

    ids: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)


async def _tally(report: DryRunReport, prepared: list[Planned], store: Store | None,
                 options: RunOptions, post_key: str, output_tokens: int,
                 seen: _Seen) -> None:
    report.rows += len(prepared)
    items = []
    for planned in prepared:
        item_id = planned.row.item_id
        if planned.error is None and item_id in seen.ids:
            planned.error = ItemError(f"row {planned.row.number}: duplicate id {item_id!r}; "
                                      "ids must be unique (load.id)")
        seen.ids.add(item_id)
        if planned.error is not None or planned.call is None:
            report.bad_rows += 1
            if len(report.bad_samples) < SAMPLES:
                report.bad_samples.append(str(planned.error))
        else:
            items.append(planned)
    if store is not None and items:
        known = await store.known(STAGE, report.origin, [
            (p.record.item_id, p.call.key) for p in items if p.call is not None])
        for planned in items:
            planned.known = known[planned.record.item_id]
    for planned in items:
        assert planned.call is not None
        action = decide(planned.known, planned.call.key, post_key, options.retry_failed,
                        options.error_class)
        if action is Action.CALL:
            if planned.call.key in seen.sent:
                report.shared += 1  # the same request as another item: one call for both
                continue
            if options.limit is not None and report.to_call >= options.limit:
                # the run sends nothing more, and reads no batch after this one
                if report.stopped_at_row is None:
                    report.stopped_at_row = planned.row.number
                continue
            seen.sent.add(planned.call.key)
            report.to_call += 1
            report.prompt_tokens += estimate_prompt_tokens(planned.call.request)
            report.completion_tokens += output_tokens
            if len(report.samples) < SAMPLES:
                report.samples.append(planned.call.request)
        elif action is Action.SKIP_DONE:
            report.done += 1
        elif action is Action.SKIP_FAILED:
            report.failed_kept += 1
        elif action is Action.POST:
            report.reposts += 1
