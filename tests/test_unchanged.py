"""Rows done before and unchanged since are skipped without rendering; anything edited (the
row, a template, a parameter, a post step) is done again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import questions, write_rows

from flow.config import LoadConfig, StageConfig
from flow.records import ItemRecord, OutputRecord, Settled, utc_now
from flow.simulator import SimulatorThread
from flow.store.sqlite import SQLiteStore
from flow.unchanged import render_fingerprint


def stage(**changes: Any) -> StageConfig:
    config: dict[str, Any] = {
        "name": "call", "model": "gpt-4o-mini", "params": {"temperature": 0},
        "messages": [{"role": "user", "content": "{{ question }}"}], **changes}
    return StageConfig.model_validate(config)


@pytest.mark.parametrize("changes", [
    {"model": "gpt-4o"}, {"params": {"temperature": 1}}, {"endpoint": "responses"},
    {"messages": [{"role": "user", "content": "Q: {{ question }}"}]}])
def test_the_fingerprint_changes_with_what_a_request_is_made_of(changes: dict[str, Any]) -> None:
    load = LoadConfig(path=Path("rows.jsonl"), id="id")
    assert render_fingerprint(load, stage(**changes)) != render_fingerprint(load, stage())


def test_the_fingerprint_ignores_how_requests_are_sent_but_not_how_rows_are_read() -> None:
    load = LoadConfig(path=Path("rows.jsonl"), id="id")
    before = render_fingerprint(load, stage())
    assert render_fingerprint(LoadConfig(path=Path("moved.jsonl"), id="id"),
                              stage(concurrency=5, rpm=60, timeout_s=9)) == before
    assert render_fingerprint(LoadConfig(path=Path("rows.jsonl"), id="key"), stage()) != before
    assert render_fingerprint(LoadConfig(path=Path("rows.jsonl"), id="id",
                                         types={"n": "int"}), stage()) != before


async def test_only_a_done_item_with_the_same_row_input_and_post_steps_is_unchanged(
        tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path / "flow.db")
    try:
        await store.begin_seen_ids()
        items = [ItemRecord(name, row, f'{{"q": "{name}"}}', f"key-{name}")
                 for row, name in enumerate("abcde", 1)]
        await store.save_items("call", "test", items)
        now = utc_now()
        for name, status in zip("abcd", ("done", "done", "done", "failed")):
            await store.save(Settled("call", "test", f"key-{name}", now, None, [], [
                OutputRecord(name, f"key-{name}", status, "post-1", f'"{name}!"')]))
        await store.flush()
        rows = [("a", 1, '{"q": "a"}'), ("b", 2, '{"q": "edited"}'), ("c", 9, '{"q": "c"}'),
                ("d", 4, '{"q": "d"}'), ("e", 5, '{"q": "e"}'), ("a", 6, '{"q": "a"}'),
                ("f", 7, None)]
        first, done = await store.see_unchanged("call", "test", "post-1", rows)
        # b's input changed, c moved, d failed, e has no output; the second a is a duplicate
        assert done == {"a": None}
        assert first == {"a": 1, "b": 2, "c": 9, "d": 4, "e": 5, "f": 7}
        # marked seen as `mark_seen` would: a later row of `a` is a duplicate
        assert await store.mark_seen([("a", 10)]) == {"a": 1}
        assert (await store.see_unchanged("call", "test", "post-1", [("a", 11, '{"q": "a"}')]
                                          ))[1] == {}
        await store.begin_seen_ids()
        assert (await store.see_unchanged("call", "test", "post-2", rows[:1]))[1] == {}
        await store.begin_seen_ids()
        assert (await store.see_unchanged("call", "other", "post-1", rows[:1]))[1] == {}
        await store.begin_seen_ids()
        assert (await store.see_unchanged("call", "test", "post-1", rows[:1],
                                          with_output=True))[1] == {"a": '"a!"'}
    finally:
        await store.close()


def test_an_edited_row_template_param_or_post_step_is_done_again(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    assert pipeline.run() == 0
    assert simulator.stats.requests == 20

    rows = questions(20)
    rows[5]["question"] = "What is the capital of Peru?"
    write_rows(pipeline.folder / "rows.jsonl", rows)
    assert pipeline.run() == 0
    assert simulator.stats.requests == 21
    outputs = {r["id"]: r["output"] for r in pipeline.export(capsys)}
    assert outputs["q00005"].endswith("You asked: What is the capital of Peru?")

    pipeline.config["call"]["messages"][1]["content"] = "Q: {{ question }}"
    assert pipeline.run() == 0
    assert simulator.stats.requests == 41
    assert all("You asked: Q: " in r["output"] for r in pipeline.export(capsys))

    pipeline.config["call"]["params"] = {"temperature": 0.5}
    assert pipeline.run() == 0
    assert simulator.stats.requests == 61

    pipeline.config["post"] = ["strip", "lower"]
    assert pipeline.run() == 0
    assert simulator.stats.requests == 61
    assert all("you asked: q: what is" in r["output"] for r in pipeline.export(capsys))
    assert pipeline.run() == 0
    assert simulator.stats.requests == 61
    assert pipeline.query("SELECT items_skipped FROM runs ORDER BY id DESC LIMIT 1") == [(20,)]


def test_items_a_template_edit_reached_before_it_was_undone_are_done_again(
        make_pipeline: Any, simulator: SimulatorThread, capsys: Any) -> None:
    pipeline = make_pipeline(base_url=simulator.url)
    assert pipeline.run() == 0
    messages = pipeline.config["call"]["messages"]
    messages[1]["content"] = "Q: {{ question }}"
    assert pipeline.run("--limit", "3") == 0  # stopped before the rest of the input is done
    assert simulator.stats.requests == 23
    messages[1]["content"] = "{{ question }}"
    assert pipeline.run() == 0
    assert simulator.stats.requests == 23  # the first replies are stored: posted again
    outputs = [r["output"] for r in pipeline.export(capsys)]
    assert len(outputs) == 20 and not any("Q: " in output for output in outputs)
