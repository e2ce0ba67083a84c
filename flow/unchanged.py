"""Rows done before and unchanged since: skipped without rendering their requests.

A re-run over a million done items spent most of its time rendering each row's request,
keying it and looking up its stored output, only to find it done. The first stage's request
for a row is a function of the row's input and of the stage's templates and parameters, so
the store records, per stage, the fingerprint of those (`render_fingerprint`) under which
every item it holds was keyed. While the fingerprint in force is the recorded one, a row
whose stored item has the same input at the same row, rendered fine and is done from its
current request under the current post steps is skipped as a full plan would skip it. Any
other row (an edited row, a failed or pending item, new post steps) is planned in full; an
edited template, model or parameter changes the fingerprint, and the whole input is planned
in full until a run has read all of it under the new one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

from flow import __version__
from flow.config import LoadConfig, StageConfig
from flow.keys import content_key
from flow.load import Row


class UnchangedStore(Protocol):
    """What skipping unchanged rows needs of a store."""

    async def see_unchanged(self, stage: str, origin: str, post_key: str,
                            rows: Sequence[tuple[str, int, str | None]],
                            with_output: bool = False
                            ) -> tuple[dict[str, int], dict[str, str | None]]: ...


def render_fingerprint(load: LoadConfig, stage: StageConfig) -> str:
    """What the stage's requests are made from, beside each row's input: how rows are read
    into fields, and the model, endpoint, messages and parameters (a `schema` included), and
    `when:`."""
    return content_key({
        "flow": __version__,
        "load": load.model_dump(mode="json", exclude={"path"}),
        "request": stage.model_dump(mode="json",
                                    include={"model", "endpoint", "messages", "params",
                                             "when"})})


def stored_input(row: Row) -> str:
    """The row's fields as the store keeps them: a JSONL row as it was read."""
    assert row.fields is not None
    return row.text or json.dumps(row.fields, ensure_ascii=False)


async def skip_unchanged(store: UnchangedStore, stage: str, origin: str, post_key: str,
                         rows: list[Row], with_output: bool
                         ) -> tuple[dict[str, int], list[Row], list[tuple[Row, str | None]]]:
    """Mark the batch's rows seen; the first row of each id, the rows to plan in full, and
    the rows done and unchanged with their outputs.

    Only a row read without error, under its own id and first with that id, can be skipped;
    bad, held and duplicate rows are planned in full.
    """
    first_rows, done = await store.see_unchanged(
        stage, origin, post_key,
        [(row.item_id, row.number, None if row.fields is None else stored_input(row))
         for row in rows if not row.generated], with_output)
    if not done:
        return first_rows, rows, []
    rest, skipped = [], []
    for row in rows:
        if (not row.generated and row.item_id in done and row.fields is not None
                and first_rows[row.item_id] == row.number):
            skipped.append((row, done[row.item_id]))
        else:
            rest.append(row)
    return first_rows, rest, skipped
