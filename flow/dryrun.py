"""A dry run: what a run would send and what it would cost, per stage, calling nothing,
writing nothing.

Every row is read, rendered and planned as a run would (`flow.plan`); the store (if any) is
only read, so a dry run works beside a live run. Prompt tokens are counted exactly with the
model's tokenizer; completion tokens are the same estimate the rate limiter reserves.

In a chain, an item whose output at a stage is stored goes on to the next stage with that
output, planned exactly; one whose stage would be called (or posted again) has no output
yet, so every later stage is counted as a call for it, its prompt estimated from the
template with the unknown output taken as long as that stage's expected completion.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flow.config import PipelineConfig
from flow.config.store_url import StoreURL
from flow.endpoints import endpoint_origin, same_origin
from flow.endpoints.chat import estimate_prompt_tokens
from flow.errors import ItemError, TemplateError
from flow.load import read_rows
from flow.plan import Action, Planned, batches, prepare, render_planned
from flow.post import PostProcessor
from flow.prices import Price, cost_usd, price_for
from flow.records import ItemRecord
from flow.render import Condition, RequestBuilder
from flow.store import Store, open_store_read_only
from flow.tokens import expected_output_tokens

if TYPE_CHECKING:
    from flow.plan import RunOptions

SAMPLES = 3


@dataclass
class StageEstimate:
    """What a run would do at one stage."""

    name: str
    model: str
    price: Price | None
    to_call: int = 0
    shared: int = 0
    done: int = 0
    failed_kept: int = 0
    reposts: int = 0
    skipped: int = 0  # `when:` false
    unknown: int = 0  # of `to_call`: an earlier stage's output is not known yet
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_request: int = 1  # an embeddings stage packs this many calls into one request

    @property
    def cost_usd(self) -> float | None:
        """Estimated dollars for the calls to be made at this stage."""
        return cost_usd(self.price, self.prompt_tokens, self.completion_tokens)


@dataclass
class DryRunReport:
    """What a run would do."""

    rows: int = 0
    bad_rows: int = 0
    stopped_at_row: int | None = None  # --limit: where the run stops reading
    origin: str = ""
    stages: list[StageEstimate] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    bad_samples: list[str] = field(default_factory=list)

    def total(self, name: str) -> int:
        """A count summed over the stages (`to_call`, `done`, ...)."""
        return sum(int(getattr(stage, name)) for stage in self.stages)

    @property
    def cost_usd(self) -> float | None:
        """Estimated dollars for every call to be made; None when a price is unknown."""
        costs = [stage.cost_usd for stage in self.stages]
        return None if any(c is None for c in costs) else sum(c or 0.0 for c in costs)


@dataclass
class _Stage:
    """One stage as the dry run plans it."""

    estimate: StageEstimate
    builder: RequestBuilder
    when: Condition | None
    post_key: str
    output_tokens: int
    sent: set[str] = field(default_factory=set)  # requests it would send: shared, not again


async def dry_run(config: PipelineConfig, options: RunOptions) -> DryRunReport:
    """Render every row, look up what is done, and estimate what is left."""
    keys = config.run_keys
    stages = []
    for index, call in enumerate(config.chain):
        key = "call" if config.stages is None else f"stages[{index}]"
        stages.append(_Stage(
            StageEstimate(call.name, call.model, price_for(call.model, call.price),
                          per_request=call.inputs_per_request
                          if call.endpoint == "embeddings" else 1),
            RequestBuilder(call, f"{config.file}: ", config.step_timeout_s, key),
            None if call.when is None else Condition(call.when, f"{key}.when"),
            PostProcessor(call.post_steps, config.file.parent, config.step_timeout_s,
                          call.on_truncated, call.checker).fingerprint,
            0 if call.endpoint == "embeddings" else
            expected_output_tokens(call.params, call.expected_output_tokens)))
    report = DryRunReport(origin=endpoint_origin(keys.base_url, options.simulate,
                                                 f"{config.file}: ", keys.endpoint_id),
                          stages=[stage.estimate for stage in stages])
    store = await _open_store(config.store)
    if store is not None:
        report.origin = same_origin(report.origin, await store.origins())
    seen: set[str] = set()
    try:
        for batch in batches(read_rows(config.load)):
            if report.stopped_at_row is not None:
                break  # --limit: the run reads no batch after the one where it stops
            items = _check_rows(report, prepare(batch, stages[0].builder, config.load.path.name),
                                seen)
            for index, stage in enumerate(stages):
                stand_in = _stand_in(stages[index - 1]) if index else 0
                items = await _tally(report, stage, items, store, options, stand_in,
                                     with_output=index < len(stages) - 1)
                if index + 1 < len(stages):
                    items = _enter(stages[index + 1], items, config.load.path.name)
    finally:
        if store is not None:
            await store.close()
    return report


def _stand_in(before: _Stage) -> int:
    """Prompt tokens for a request whose earlier output is not known yet: the earlier
    stage's average prompt, which later prompts usually quote, and its expected output."""
    estimate = before.estimate
    return estimate.prompt_tokens // max(1, estimate.to_call) + before.output_tokens


def _check_rows(report: DryRunReport, prepared: list[Planned], seen: set[str]) -> list[Planned]:
    """The rows that render, each id once; the rest counted as bad rows, as in a run."""
    report.rows += len(prepared)
    items = []
    for planned in prepared:
        item_id = planned.row.item_id
        if planned.error is None and item_id in seen:
            planned.error = ItemError(f"row {planned.row.number}: duplicate id {item_id!r}; "
                                      "ids must be unique (load.id)")
        seen.add(item_id)
        if planned.error is not None or planned.call is None:
            report.bad_rows += 1
            if len(report.bad_samples) < SAMPLES:
                report.bad_samples.append(str(planned.error))
        else:
            items.append(planned)
    return items


def _enter(stage: _Stage, items: list[Planned], source: str) -> list[Planned]:
    """The items going on to `stage`, rendered with the earlier outputs; those whose output
    comes from a call (`fresh`) cannot be rendered yet: they count as calls."""
    entered = []
    for planned in items:
        upstream = planned.upstream
        record = ItemRecord(planned.record.item_id, planned.row.number, None, None)
        fields = {**(planned.row.fields or {}), **upstream}
        where = f"{source} row {planned.row.number}"
        if planned.fresh:
            stage.estimate.unknown += 1
            entered.append(Planned(planned.row, record, None, upstream=upstream, fresh=True))
            continue
        try:
            if stage.when is not None and not stage.when.holds(fields, where):
                stage.estimate.skipped += 1
                entered.append(Planned(planned.row, record, None, upstream=upstream,
                                       fresh=False))
                entered[-1].record.skipped = True
                continue
        except TemplateError:
            continue  # fails at this stage in the run: nothing sent
        rendered = render_planned(Planned(planned.row, record, None, upstream=upstream),
                                  stage.builder, source)
        if rendered.error is None:
            entered.append(rendered)
    return entered


async def _tally(report: DryRunReport, stage: _Stage, items: list[Planned],
                 store: Store | None, options: RunOptions, stand_in: int,
                 with_output: bool) -> list[Planned]:
    """Count what the run would do with each item at this stage; the items that go on."""
    estimate = stage.estimate
    going_on = [p for p in items if p.record.skipped]
    planned_items = [p for p in items if not p.record.skipped and not p.fresh]
    if store is not None and planned_items:
        known = await store.known(estimate.name, report.origin, [
            (p.record.item_id, p.call.key) for p in planned_items if p.call is not None],
            with_output=with_output)
        for planned in planned_items:
            planned.known = known[planned.record.item_id]
    for planned in items:
        if planned.record.skipped:
            continue
        if planned.fresh:
            _count_call(report, estimate, None, stage.output_tokens, stand_in)
            going_on.append(planned)
            continue
        assert planned.call is not None
        action = options.decide(planned.known, planned.call.key, stage.post_key, estimate.name)
        if action is Action.CALL:
            if planned.call.key in stage.sent:
                estimate.shared += 1  # the same request as another item: one call for both
                going_on.append(_fresh(planned))
                continue
            if options.limit is not None and report.total("to_call") >= options.limit:
                # the run sends nothing more, and reads no batch after this one
                if report.stopped_at_row is None:
                    report.stopped_at_row = planned.row.number
                continue
            stage.sent.add(planned.call.key)
            _count_call(report, estimate, planned.call.request, stage.output_tokens, 0)
            going_on.append(_fresh(planned))
        elif action is Action.SKIP_DONE:
            estimate.done += 1
            if planned.known.output is not None:
                planned.upstream = {**planned.upstream,
                                    estimate.name: {"output": json.loads(planned.known.output)}}
            going_on.append(planned)
        elif action is Action.SKIP_FAILED:
            estimate.failed_kept += 1
        elif action is Action.POST:
            estimate.reposts += 1
            going_on.append(_fresh(planned))
    return going_on


def _fresh(planned: Planned) -> Planned:
    planned.fresh = True
    return planned


def _count_call(report: DryRunReport, estimate: StageEstimate,
                request: dict[str, Any] | None, output_tokens: int, stand_in: int) -> None:
    """One call at this stage: its prompt counted when its request is known, else
    `stand_in` tokens."""
    estimate.to_call += 1
    estimate.completion_tokens += output_tokens
    if request is None:
        estimate.prompt_tokens += stand_in
        return
    estimate.prompt_tokens += estimate_prompt_tokens(request)
    if len(report.samples) < SAMPLES:
        report.samples.append(request)


async def _open_store(where: Path | StoreURL) -> Store | None:
    """The store to compare with, read-only; None before it exists."""
    if isinstance(where, StoreURL):
        from flow.store.postgres.store import PostgresStore

        return await PostgresStore.open_read_only(where)
    exists = os.path.exists(where)  # noqa: ASYNC240 - one stat, before anything runs
    return await open_store_read_only(where) if exists else None
