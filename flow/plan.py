"""Planning: what to do with each item of a batch, before anything is sent.

A batch of rows is rendered and keyed (`prepare`), recorded in the store with duplicate ids
refused (`Planner.record`), and each item's stored state decides its `Action`. The run and
the dry run plan the same way.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flow.errors import ItemError, TemplateError
from flow.keys import key_of_json
from flow.load import Row, generated_id
from flow.records import STAGE, Call, ItemRecord, Known
from flow.render import RequestBuilder
from flow.unchanged import stored_input

BATCH_ROWS = 1000  # rows planned together: one store look-up each
HELD_CHUNK = 1000  # held rows named together at the input's end


class Action(enum.Enum):
    """What a run does with one item."""

    CALL = "call"                # no usable reply to its request yet: send it
    POST = "post"                # a reply is stored: make the output from it, no call
    SKIP_DONE = "skip-done"      # its output is up to date
    SKIP_FAILED = "skip-failed"  # it failed with a paid reply; --retry-failed calls again
    SKIP_PENDING = "skip-pending"  # --retry-failed: it has not failed, leave it


def decide(known: Known, key: str, post_key: str, retry_failed: bool = False,
           error_class: str | None = None, recall: bool = False,
           retry_here: bool = True) -> Action:
    """The action for an item whose current request is `key`, given what the store holds.

    `--retry-failed` sends a failed item's request again, except when it failed in a post
    step: then the post steps are applied to its stored reply again (a step fixed in a
    module), and nothing is paid unless `recall` says so. At a stage it does not name
    (`--stage`, `retry_here` false) nothing is retried: only what is done goes on.
    """
    current = known.output_key == key
    if retry_failed:
        if (current and known.status == "failed" and retry_here
                and error_class in (None, known.error_class)):
            if known.error_class == "PostError" and known.reply_id is not None and not recall:
                return Action.POST
            return Action.CALL
        if not current:
            return Action.SKIP_PENDING
        action = decide(known, key, post_key)
        return Action.SKIP_FAILED if action is Action.CALL else action
    if current and known.post_key == post_key:
        if known.status == "done":
            return Action.SKIP_DONE
        if known.response_id is not None:
            return Action.SKIP_FAILED
    if known.reply_id is not None:
        return Action.POST
    return Action.CALL


@dataclass
class RunOptions:
    """How to run, beyond the pipeline file."""

    simulate: bool = False
    base_url: str | None = None
    api_key: str | None = None
    limit: int | None = None
    retry_failed: bool = False
    error_class: str | None = None
    take_over_store: bool = False
    recall: bool = False  # --retry-failed: buy replies again even for post-step failures
    stage: str | None = None  # --retry-failed: only the failures of this stage
    detach: bool = False  # batch stages: submit the batches and return; a re-run collects

    def decide(self, known: Known, key: str, post_key: str, stage: str,
               fresh: bool = False) -> Action:
        """The action for an item at `stage`; an item an earlier stage made anew in this
        run (`fresh`) goes on as in a full run, whatever `--retry-failed` says."""
        if fresh or not self.retry_failed:
            return decide(known, key, post_key)
        return decide(known, key, post_key, True, self.error_class, self.recall,
                      self.stage in (None, stage))


@dataclass(slots=True)
class Planned:
    """One row on its way: its record, its call (when it renders), or why it fails."""

    row: Row
    record: ItemRecord
    error: ItemError | None
    call: Call | None = None
    known: Known = field(default_factory=Known)
    # what earlier stages made of the item, by stage name: {"answer": {"output": ...}}
    upstream: dict[str, Any] = field(default_factory=dict)
    # an earlier stage made a new output for it in this run: it goes on as in a full run
    fresh: bool = False


def batches(rows: Iterator[Row], size: int = BATCH_ROWS) -> Iterator[list[Row]]:
    """The rows in lists of `size`, the unit planned together."""
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(rows: Sequence[Row], builder: RequestBuilder, source: str) -> list[Planned]:
    """Render each row's request and key it (the CPU half of planning a batch)."""
    return [render_planned(Planned(row, ItemRecord(row.item_id, row.number, None, None),
                                   row.error), builder, source) for row in rows]


def render_planned(planned: Planned, builder: RequestBuilder, source: str) -> Planned:
    """Render `planned`'s request over its row's fields and earlier stages' outputs, and
    key it; a template that fails sets its error."""
    row = planned.row
    if planned.error is None and row.fields is not None:
        try:
            fields = {**row.fields, **planned.upstream} if planned.upstream else row.fields
            request, request_json = builder.build_with_json(fields, f"{source} row {row.number}")
            key = key_of_json(request_json)
            planned.call = Call(key, request, request_json)
            planned.record.request_key = key
        except TemplateError as e:
            planned.error = e
    return planned


class PlanStore(Protocol):
    """What planning needs of a store."""

    async def mark_seen(self, rows: Sequence[tuple[str, int]]) -> dict[str, int]: ...

    async def hold(self, rows: Sequence[tuple[int, str, str | None, str | None]]) -> None: ...

    async def held(self, after_row: int,
                   limit: int) -> list[tuple[int, str, str | None, str | None]]: ...

    async def known_items(self, stage: str,
                          item_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]: ...

    async def save_items(self, stage: str, origin: str,
                         items: Sequence[ItemRecord]) -> None: ...

    async def known(self, stage: str, origin: str, items: Sequence[tuple[str, str]],
                    with_output: bool = False) -> dict[str, Known]: ...


@dataclass(slots=True)
class PlanCounts:
    """What planning found: bad rows, and items whose request changed since the last run."""

    failed: int = 0
    rerendered: int = 0
    errors: list[tuple[str | None, str | None]] = field(default_factory=list)  # of failed rows


class Planner:
    """Records each batch of items of one stage in the store and looks up what it holds for
    them; an item that fails here is recorded as stopped at each later stage."""

    def __init__(self, store: PlanStore, origin: str, source: str, stage: str = STAGE,
                 later: Sequence[str] = ()) -> None:
        self._store = store
        self._origin = origin
        self._source = source
        self.stage = stage
        self._later = list(later)
        self.counts = PlanCounts()

    def take_counts(self) -> PlanCounts:
        """What planning found since the last call."""
        counts, self.counts = self.counts, PlanCounts()
        return counts

    async def mark_seen(self, rows: Sequence[Row]) -> dict[str, int]:
        """Remember the rows' own ids as read; the first row of each."""
        return await self._store.mark_seen([(row.item_id, row.number) for row in rows
                                            if not row.generated])

    async def record(self, prepared: list[Planned],
                     first_rows: dict[str, int] | None = None) -> list[Planned]:
        """Save the batch's items (refusing duplicate ids); the items that can be called.
        `first_rows`: the batch is already marked seen, with this answer.

        Rows whose own id cannot be used (a bad row, a duplicate) are held, and named by
        `name_held` once the whole input is read: by then every real id is known, so an id
        flow makes up never takes one a real row has, whichever comes first in the file.
        """
        if first_rows is None:
            first_rows = await self.mark_seen([p.row for p in prepared])
        held: list[tuple[int, str, str | None, str | None]] = []
        named: list[ItemRecord] = []
        callable_items = []
        for planned in prepared:
            row, record = planned.row, planned.record
            duplicate = not row.generated and first_rows[row.item_id] != row.number
            if duplicate:
                planned.call = None
                record.request_key = None
                planned.error = ItemError(
                    f"{self._source} row {row.number}: duplicate id {row.item_id!r} (first at "
                    f"row {first_rows[row.item_id]}); ids must be unique (load.id)")
            if planned.error is not None:
                error = planned.error
                record.error_class = "RowError" if type(error) is ItemError else error.error_class
                record.error = str(error)
                self.counts.failed += 1
                self.counts.errors.append((record.error_class, record.error))
            if row.generated or duplicate:
                held.append((row.number, row.item_id if duplicate else "", record.error_class,
                             record.error))
                continue
            if row.fields is not None and record.error_class is None:
                # a JSONL row is stored as it was read: no serializing a million rows again
                record.input = stored_input(row)
            named.append(record)
            if planned.call is not None:
                callable_items.append(planned)
        if held:
            await self._store.hold(held)
        await self.save(named)
        await self.stop_later([record for record in named if record.error_class is not None])
        return callable_items

    async def save(self, records: list[ItemRecord]) -> None:
        """Save this stage's records that differ from what the store holds."""
        await self._store.save_items(self.stage, self._origin,
                                     await self._changed(self.stage, records))

    async def stop_later(self, failed: Sequence[ItemRecord]) -> None:
        """Record items that failed at this stage (with their row, class and error) as
        stopped at every later stage, so that no later stage keeps an output made from what
        they were before."""
        if not self._later or not failed:
            return
        for stage in self._later:
            records = [ItemRecord(f.item_id, f.row, None, None, f.error_class,
                                  f"stopped at stage '{self.stage}': {f.error}",
                                  stopped_at=self.stage) for f in failed]
            await self._store.save_items(stage, self._origin,
                                         await self._changed(stage, records))

    async def name_held(self) -> None:
        """Name and save the held rows, the whole input read: `#row7` for a bad row,
        `x#row7` for a duplicate of `x`; a name a real row has takes a further suffix."""
        after = 0
        while chunk := await self._store.held(after, HELD_CHUNK):
            records = [ItemRecord(generated_id(number, base), number, None, None,
                                  error_class, error)
                       for number, base, error_class, error in chunk]
            await self._claim(records)
            await self.save(records)
            await self.stop_later(records)
            after = chunk[-1][0]

    async def _claim(self, records: list[ItemRecord]) -> None:
        """Mark the made-up ids seen; one that is already another row's takes a suffix."""
        base = {id(record): record.item_id for record in records}
        for attempt in itertools.count(2):
            if not records:
                return
            first = await self._store.mark_seen([(r.item_id, r.row) for r in records])
            records = [record for record in records if first[record.item_id] != record.row]
            for record in records:
                record.item_id = f"{base[id(record)]}#{attempt}"

    async def look_up(self, items: list[Planned]) -> None:
        """Fill in what the store holds for each item (its output, its request's reply; the
        output's JSON too when a later stage renders from it)."""
        known = await self._store.known(self.stage, self._origin, [
            (p.record.item_id, p.call.key) for p in items if p.call is not None],
            with_output=bool(self._later))
        for planned in items:
            planned.known = known.get(planned.record.item_id, Known())

    async def _changed(self, stage: str, records: list[ItemRecord]) -> list[ItemRecord]:
        """The records that differ from what the store holds (most re-runs write nothing).

        The row's own fields count too: a field no template reads still shows in `flow show`
        and `flow export --fields`.
        """
        stored = await self._store.known_items(stage, [r.item_id for r in records])
        changed = []
        for record in records:
            before = stored.get(record.item_id)
            if before == record.stored(self._origin):
                continue
            if before is not None and before[1] != record.request_key and stage == self.stage:
                self.counts.rerendered += 1
            changed.append(record)
        return changed
