"""What a call's result, or a stored reply, makes of the items waiting on it.

Each item gets its output (the post steps applied to the reply) or its failure; the paid
reply is priced once and counted into the run's spend; every output is counted into the
run's progress and shown to the breaker. The result is a `Settled`: one unit the store commits whole.
"""

from __future__ import annotations

from flow.budget import Breaker
from flow.endpoints.wire import read_stored_reply
from flow.plan import Planned
from flow.post import PostProcessor
from flow.prices import Price, batch_price, priced_reply
from flow.progress import RunProgress, StageCounts
from flow.records import STAGE, Attempt, CallResult, OutputRecord, ResponseRecord, Settled, utc_now


class Outcomes:
    """Turns results into outputs to commit, counting them as they go."""

    def __init__(self, post: PostProcessor, price: Price | None, origin: str,
                 progress: RunProgress, breaker: Breaker, stage: str = STAGE,
                 last: bool = True) -> None:
        self._post = post
        self._breaker = breaker
        self._price = price
        self.origin = origin
        self._progress = progress
        self._stage = stage
        self._last = last  # the chain's last stage: its done items are the run's
        self.counts = progress.stages.setdefault(stage, StageCounts())

    def response(self, result: CallResult) -> ResponseRecord | None:
        """The paid reply to store, with its cost (at batch prices when it came through a
        batch); counted into the run's spend once."""
        price = batch_price(self._price) if result.batch_id is not None else self._price
        response = priced_reply(result, self.origin, price)
        if response is not None:
            self._progress.prompt_tokens += response.usage.prompt_tokens
            self._progress.completion_tokens += response.usage.completion_tokens
            self._progress.cost_usd += response.cost_usd or 0.0
        return response

    def for_result(self, result: CallResult, items: list[Planned],
                   response: ResponseRecord | None, attempts: list[Attempt]) -> Settled:
        """The outputs a call's result gives `items`, as one unit to commit, with the replies
        those items used before (a re-buy, an earlier request), which may need a payer."""
        outputs = []
        for planned in items:
            assert planned.call is not None
            outputs.append(self._post.output_for(
                planned.record.item_id, planned.call.key, result.reply, result.error_class,
                result.error, len(result.attempts)))
        self._count(outputs)
        before = sorted({p.known.response_id for p in items if p.known.response_id is not None})
        return Settled(self._stage, self.origin, result.call.key, result.finished_at,
                       response, attempts, outputs, before)

    def from_stored(self, items: list[Planned], bodies: dict[int, str]) -> Settled:
        """The outputs stored replies give `items` (their post steps or requests changed)."""
        outputs = []
        reassign: set[int] = set()
        for planned in items:
            known = planned.known
            assert planned.call is not None and known.reply_id is not None
            reply, error_class, error = read_stored_reply(bodies.get(known.reply_id, ""))
            output = self._post.output_for(planned.record.item_id, planned.call.key, reply,
                                           error_class, error)
            output.response_id = known.reply_id
            if known.response_id == known.reply_id:
                output.bought = known.bought
            else:
                reassign.update(r for r in (known.response_id, known.reply_id) if r is not None)
            outputs.append(output)
        self._count(outputs)
        self._progress.reused += len(outputs)
        return Settled(self._stage, self.origin, "", utc_now(), None, [], outputs,
                       sorted(reassign))

    def _count(self, outputs: list[OutputRecord]) -> None:
        for output in outputs:
            if output.status == "done":
                self.counts.done += 1
                self._progress.done += self._last
                self._progress.truncated += output.truncated
            else:
                self.count_failed()
            self._breaker.observe(output.error_class, output.error)

    def take_back(self, outputs: list[OutputRecord]) -> None:
        """Outputs counted that were not kept (another worker's result stands): uncounted."""
        for output in outputs:
            if output.status == "done":
                self.counts.done -= 1
                self._progress.done -= self._last
                self._progress.truncated -= output.truncated
            else:
                self.count_failed(-1)

    def count_failed(self, items: int = 1) -> None:
        """Items failed at this stage: failed for the run too (they stop here)."""
        self.counts.failed += items
        self._progress.failed += items

    def count_done_before(self, items: int) -> None:
        """Items whose output at this stage was done before this run."""
        self.counts.done += items
        self.counts.already_done += items
        if self._last:
            self._progress.done += items
            self._progress.skipped += items

    def count_skipped(self, items: int) -> None:
        """Items this stage's `when:` skipped; at the last stage they are finished."""
        self.counts.skipped += items
        if self._last:
            self._progress.passed_over += items
