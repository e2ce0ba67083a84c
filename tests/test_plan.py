"""Planning: the action each item gets, rendering and keying a batch, recording it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flow.config import CallConfig
from flow.errors import RowError, TemplateError
from flow.keys import content_key
from flow.load import Row
from flow.plan import Action, Planner, decide, prepare
from flow.records import STAGE, ItemRecord, Known
from flow.render import RequestBuilder

KEY = "sha256:" + "a" * 64
OLD_KEY = "sha256:" + "b" * 64
POST = "post-now"
OLD_POST = "post-before"
SOURCE = "rows.jsonl"
ORIGIN = "https://api.example.test/v1"


def done(**changes: Any) -> Known:
    """An item whose output was made from a reply to KEY under the current post steps."""
    values: dict[str, Any] = {"output_key": KEY, "post_key": POST, "status": "done",
                              "response_id": 1, "bought": True, "reply_id": 1}
    return Known(**{**values, **changes})


def failed(error_class: str, response_id: int | None, **changes: Any) -> Known:
    """An item that failed on KEY; `response_id` is the paid reply it failed on, if any."""
    values: dict[str, Any] = {"output_key": KEY, "post_key": POST, "status": "failed",
                              "error_class": error_class, "response_id": response_id,
                              "bought": response_id is not None, "reply_id": response_id}
    return Known(**{**values, **changes})


def builder(content: str = "{{ question }}") -> RequestBuilder:
    return RequestBuilder(CallConfig.model_validate({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": content}],
        "params": {"temperature": 0, "max_tokens": 50}}))


class FakePlanStore:
    """A PlanStore in memory: the run's seen ids, the items table, and a log of writes."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.items: dict[tuple[str, str], ItemRecord] = {}
        self.known_by_id: dict[str, Known] = {}
        self.saves: list[list[ItemRecord]] = []
        self.known_calls: list[list[tuple[str, str]]] = []
        self.held_rows: dict[int, tuple[int, str, str | None, str | None]] = {}

    def new_run(self) -> None:
        """What a new run starts with: no ids seen yet, the items table as it was."""
        self.seen.clear()
        self.held_rows.clear()

    async def hold(self, rows: Sequence[tuple[int, str, str | None, str | None]]) -> None:
        for held in rows:
            self.held_rows[held[0]] = held

    async def held(self, after_row: int,
                   limit: int) -> list[tuple[int, str, str | None, str | None]]:
        return sorted(held for number, held in self.held_rows.items() if number > after_row)[
            :limit]

    async def mark_seen(self, rows: Sequence[tuple[str, int]]) -> dict[str, int]:
        first = {}
        for item_id, row in rows:
            first[item_id] = self.seen.setdefault(item_id, row)
        return first

    async def known_items(self, stage: str,
                          item_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        return {item_id: r.stored(ORIGIN)
                for item_id in item_ids if (r := self.items.get((stage, item_id)))}

    async def save_items(self, stage: str, origin: str, items: Sequence[ItemRecord]) -> None:
        assert origin == ORIGIN
        self.saves.append([ItemRecord(r.item_id, r.row, r.input, r.request_key, r.error_class,
                                      r.error, r.skipped, r.stopped_at) for r in items])
        for record in self.saves[-1]:
            self.items[(stage, record.item_id)] = record

    async def known(self, stage: str, origin: str, items: Sequence[tuple[str, str]],
                    with_output: bool = False) -> dict[str, Known]:
        self.known_calls.append(list(items))
        return {item_id: self.known_by_id[item_id] for item_id, _ in items
                if item_id in self.known_by_id}


def rows(*questions: tuple[str, str]) -> list[Row]:
    return [Row(number, item_id, {"id": item_id, "question": question})
            for number, (item_id, question) in enumerate(questions, start=1)]


# decide: one action per stored state


def test_decide_calls_when_nothing_is_stored() -> None:
    assert decide(Known(), KEY, POST) is Action.CALL


def test_decide_skips_an_output_that_is_current() -> None:
    assert decide(done(), KEY, POST) is Action.SKIP_DONE


def test_decide_reposts_the_stored_reply_when_post_steps_changed() -> None:
    assert decide(done(post_key=OLD_POST), KEY, POST) is Action.POST


def test_decide_posts_another_items_reply_to_the_same_request_when_it_has_no_output() -> None:
    assert decide(Known(reply_id=7), KEY, POST) is Action.POST


def test_decide_skips_a_failure_on_a_paid_reply_under_the_same_post_steps() -> None:
    assert decide(failed("ResponseError", response_id=3), KEY, POST) is Action.SKIP_FAILED


def test_decide_calls_again_when_it_failed_without_a_reply() -> None:
    assert decide(failed("BadRequestError", response_id=None), KEY, POST) is Action.CALL


def test_decide_calls_after_a_template_change_with_no_reply_for_the_new_request() -> None:
    stale = done(output_key=OLD_KEY, reply_id=None)
    assert decide(stale, KEY, POST) is Action.CALL


def test_decide_posts_after_a_template_change_when_the_new_request_has_a_reply() -> None:
    stale = done(output_key=OLD_KEY, reply_id=9)
    assert decide(stale, KEY, POST) is Action.POST


@pytest.mark.parametrize("error_class", [None, "ResponseError"])
def test_retry_failed_calls_failed_items_of_the_chosen_class(error_class: str | None) -> None:
    known = failed("ResponseError", response_id=3)
    assert decide(known, KEY, POST, retry_failed=True, error_class=error_class) is Action.CALL


def test_retry_failed_skips_failed_items_of_another_class() -> None:
    known = failed("ResponseError", response_id=3)
    action = decide(known, KEY, POST, retry_failed=True, error_class="InternalServerError")
    assert action is Action.SKIP_FAILED


def test_retry_failed_skips_failed_items_without_a_reply_of_another_class() -> None:
    known = failed("BadRequestError", response_id=None)
    action = decide(known, KEY, POST, retry_failed=True, error_class="ResponseError")
    assert action is Action.SKIP_FAILED


def test_retry_failed_leaves_items_with_no_output_pending() -> None:
    assert decide(Known(), KEY, POST, retry_failed=True) is Action.SKIP_PENDING
    assert decide(Known(reply_id=7), KEY, POST, retry_failed=True) is Action.SKIP_PENDING


def test_retry_failed_skips_done_items() -> None:
    assert decide(done(), KEY, POST, retry_failed=True) is Action.SKIP_DONE
    action = decide(done(), KEY, POST, retry_failed=True, error_class="ResponseError")
    assert action is Action.SKIP_DONE


# prepare: render and key each row


@pytest.mark.parametrize("content", ["{{ question }}", "Q: {{ question | trim | upper }}"])
def test_prepare_keys_a_rendered_row_by_its_request(content: str) -> None:
    [planned] = prepare([Row(4, "a", {"question": " what is 2 + 2? é "})], builder(content),
                        SOURCE)
    assert planned.error is None
    assert planned.call is not None
    assert planned.call.key == content_key(planned.call.request)
    assert planned.call.request["messages"][-1]["role"] == "user"
    assert json.loads(planned.call.request_json) == planned.call.request
    assert planned.record == ItemRecord("a", 4, None, planned.call.key)


@given(st.text(), st.one_of(st.integers(), st.floats(allow_nan=False), st.text()))
def test_prepare_key_is_the_content_key_of_any_request(question: str, extra: Any) -> None:
    [planned] = prepare([Row(1, "a", {"question": question, "extra": extra})],
                        builder("{{ question }} / {{ extra }}"), SOURCE)
    assert planned.call is not None
    assert planned.call.key == content_key(planned.call.request)


def test_prepare_fails_a_row_missing_a_template_field_without_a_call() -> None:
    [planned] = prepare([Row(5, "b", {"topic": "x"})], builder(), SOURCE)
    assert isinstance(planned.error, TemplateError)
    assert "rows.jsonl row 5" in str(planned.error)
    assert "missing template field 'question'" in str(planned.error)
    assert planned.call is None
    assert planned.record.request_key is None


def test_prepare_keeps_a_rows_own_error() -> None:
    error = RowError("rows.jsonl line 6: not valid JSON")
    [planned] = prepare([Row(6, "6", None, error)], builder(), SOURCE)
    assert planned.error is error
    assert planned.call is None
    assert planned.record.request_key is None


# Planner: recording a batch in the store


async def test_record_refuses_a_duplicate_id_naming_the_first_row() -> None:
    store = FakePlanStore()
    planner = Planner(store, ORIGIN, SOURCE)
    prepared = prepare(rows(("a", "one"), ("b", "two"), ("a", "three")), builder(), SOURCE)
    callable_items = await planner.record(prepared)

    assert [p.record.item_id for p in callable_items] == ["a", "b"]
    duplicate = prepared[2]
    assert duplicate.call is None
    assert sorted(r.item_id for r in store.saves[-1]) == ["a", "b"]
    # named once the whole input is read, when every real id is known
    await planner.name_held()
    saved = store.items[("call", "a#row3")]
    assert (saved.row, saved.request_key, saved.error_class) == (3, None, "RowError")
    assert saved.error == ("rows.jsonl row 3: duplicate id 'a' (first at row 1); "
                           "ids must be unique (load.id)")
    assert store.seen == {"a": 1, "b": 2, "a#row3": 3}
    assert planner.take_counts().failed == 1


async def test_record_refuses_an_id_seen_in_an_earlier_batch() -> None:
    store = FakePlanStore()
    planner = Planner(store, ORIGIN, SOURCE)
    await planner.record(prepare(rows(("a", "one")), builder(), SOURCE))
    later = prepare([Row(9, "a", {"question": "again"})], builder(), SOURCE)
    assert await planner.record(later) == []
    assert "(first at row 1)" in str(later[0].error)
    await planner.name_held()
    assert ("call", "a#row9") in store.items


async def test_record_saves_failed_rows_with_their_reason_and_not_their_input() -> None:
    store = FakePlanStore()
    planner = Planner(store, ORIGIN, SOURCE)
    bad = Row(2, "#row2", None, RowError("rows.jsonl line 2: not valid JSON"), generated=True)
    batch = [Row(1, "a", {"question": "one"}), bad, Row(3, "c", {"topic": "x"})]
    callable_items = await planner.record(prepare(batch, builder(), SOURCE))
    await planner.name_held()

    assert [p.record.item_id for p in callable_items] == ["a"]
    saved = {r.item_id: r for save in store.saves for r in save}
    assert json.loads(saved["a"].input or "") == {"question": "one"}
    assert (saved["#row2"].error_class, saved["#row2"].input) == ("RowError", None)
    assert (saved["c"].error_class, saved["c"].input) == ("TemplateError", None)
    assert "missing template field 'question'" in (saved["c"].error or "")
    assert planner.take_counts().failed == 2


async def test_record_writes_nothing_on_a_rerun_over_unchanged_rows() -> None:
    store = FakePlanStore()
    batch = [*rows(("a", "one"), ("b", "two"), ("a", "dup")),
             Row(4, "#row4", None, RowError("rows.jsonl line 4: not valid JSON"), generated=True)]
    planner = Planner(store, ORIGIN, SOURCE)
    await planner.record(prepare(batch, builder(), SOURCE))
    await planner.name_held()
    assert sorted(store.seen) == ["#row4", "a", "a#row3", "b"]
    assert sum(len(save) for save in store.saves) == 4

    store.new_run()
    saves = len(store.saves)
    planner = Planner(store, ORIGIN, SOURCE)
    callable_items = await planner.record(prepare(batch, builder(), SOURCE))
    await planner.name_held()
    assert [p.record.item_id for p in callable_items] == ["a", "b"]
    assert all(save == [] for save in store.saves[saves:])
    assert planner.take_counts().rerendered == 0


async def test_record_counts_items_whose_request_changed_as_rerendered() -> None:
    store = FakePlanStore()
    await Planner(store, ORIGIN, SOURCE).record(
        prepare(rows(("a", "one"), ("b", "two")), builder(), SOURCE))
    before = {r.item_id: r.request_key for r in store.saves[-1]}

    store.new_run()
    planner = Planner(store, ORIGIN, SOURCE)
    batch = rows(("a", "one"), ("b", "two"), ("c", "three"))
    await planner.record(prepare(batch, builder("Q: {{ question }}"), SOURCE))
    saved = {r.item_id: r.request_key for r in store.saves[-1]}
    assert sorted(saved) == ["a", "b", "c"]
    assert saved["a"] != before["a"]
    counts = planner.take_counts()
    assert counts.rerendered == 2  # c is new, not re-rendered
    assert planner.take_counts().rerendered == 0


async def test_record_saves_a_row_whose_fields_changed_outside_the_template() -> None:
    store = FakePlanStore()
    first = [Row(1, "a", {"question": "one", "label": "cat"})]
    await Planner(store, ORIGIN, SOURCE).record(prepare(first, builder(), SOURCE))

    store.new_run()
    edited = [Row(1, "a", {"question": "one", "label": "dog"})]
    await Planner(store, ORIGIN, SOURCE).record(prepare(edited, builder(), SOURCE))
    assert json.loads(store.items[(STAGE, "a")].input or "") == edited[0].fields


async def test_look_up_gives_each_item_what_the_store_holds_for_its_request() -> None:
    store = FakePlanStore()
    store.known_by_id["a"] = done()
    planner = Planner(store, ORIGIN, SOURCE)
    prepared = prepare(rows(("a", "one"), ("b", "two")), builder(), SOURCE)
    callable_items = await planner.record(prepared)
    await planner.look_up(callable_items)

    assert store.known_calls == [[(p.record.item_id, p.call.key)
                                  for p in prepared if p.call is not None]]
    assert [p.known for p in callable_items] == [done(), Known()]


async def test_a_generated_id_yields_to_a_real_row_that_holds_it() -> None:
    store = FakePlanStore()
    planner = Planner(store, ORIGIN, SOURCE)
    # a bad row, then a real row whose id is the one flow would make up for the bad row
    bad = Row(2, "#row2", None, RowError("rows.jsonl row 2: not valid JSON"), generated=True)
    await planner.record(prepare([bad], builder(), SOURCE))
    real = await planner.record(prepare([Row(9, "#row2", {"question": "one"})], builder(),
                                        SOURCE))
    assert [p.record.item_id for p in real] == ["#row2"]
    await planner.name_held()
    assert store.items[("call", "#row2")].error_class is None
    assert store.items[("call", "#row2#2")].error == "rows.jsonl row 2: not valid JSON"


async def test_duplicate_renames_never_take_a_real_id() -> None:
    store = FakePlanStore()
    planner = Planner(store, ORIGIN, SOURCE)
    # `x#row2` is a real id, later in the file than the duplicate that would be renamed to it
    prepared = prepare(rows(("x", "one"), ("x", "two"), ("x#row2", "three"), ("x", "four")),
                       builder(), SOURCE)
    callable_items = await planner.record(prepared)
    assert [p.record.item_id for p in callable_items] == ["x", "x#row2"]
    await planner.name_held()
    assert store.items[("call", "x#row2")].error_class is None
    assert store.items[("call", "x#row2#2")].row == 2
    assert store.items[("call", "x#row4")].row == 4


def test_retry_failed_posts_a_post_step_failure_again_unless_told_to_recall() -> None:
    known = failed("PostError", 4, reply_id=4)
    assert decide(known, KEY, POST, retry_failed=True) is Action.POST
    assert decide(known, KEY, POST, retry_failed=True, error_class="PostError") is Action.POST
    assert decide(known, KEY, POST, retry_failed=True, recall=True) is Action.CALL
