"""Re-asking a reply that breaks the stage's schema, quoting what was wrong with it.

A reply that does not match `call.schema` is paid for and kept, and the model is asked again:
the same request with the reply and the mismatch appended (`reask_shape.reask_messages`). Each
re-ask is a request of its own, keyed by its content, sent through the same executor (its
limiter, its retries). After `call.schema_retries` re-asks the last reply stands: the item
fails with `SchemaError` naming the mismatch. The waiting items get their output from the
reply that ends the exchange; their request stays the one their row renders.

A re-ask the store answered before (a run killed after it, a post step edited since) is read
back, not bought again; one the budget or a stop does not let go out leaves the items pending,
so the next run re-asks from the kept reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from flow.endpoints.wire import read_stored_reply
from flow.keys import canonical_json, key_of_json
from flow.post import PostProcessor
from flow.reask_shape import reask_messages
from flow.records import Call, CallResult, utc_now

Send = Callable[[Call], Awaitable[CallResult]]
Keep = Callable[[CallResult], Awaitable[CallResult]]  # stores a paid reply: its stored form


@dataclass
class Exchange:
    """The reply that stands, and the invalid replies before it (paid, to be kept)."""

    final: CallResult
    invalid: list[CallResult] = field(default_factory=list)
    stopped: bool = False  # a re-ask was due but not sent: the items wait for the next run


class Reasker:
    """Sends the re-asks one stage's schema allows."""

    def __init__(self, post: PostProcessor, retries: int, send: Send, keep: Keep) -> None:
        self._post = post
        self._retries = retries
        self._send = send
        self._keep = keep
        self.reasks = 0  # sent in this run

    def wants(self, result: CallResult) -> bool:
        """Whether `result`'s reply breaks the schema and may be re-asked."""
        reply = result.reply
        return (self._retries > 0 and reply is not None and not reply.truncated
                and self._post.mismatch(reply.text) is not None)

    async def exchange(self, result: CallResult) -> Exchange:
        """Re-ask while the reply breaks the schema and re-asks are left."""
        exchange = Exchange(result)
        while len(exchange.invalid) < self._retries:
            reply = exchange.final.reply
            if reply is None or reply.truncated:
                break  # no reply, or one cut short: not the model's mistake to correct
            mismatch = self._post.mismatch(reply.text)
            if mismatch is None:
                break
            # the reply that broke the schema is on disk before its re-ask goes out: a kill
            # while the re-ask is on its way loses nothing paid
            exchange.final = await self._keep(exchange.final)
            request = reask_messages(exchange.final.call.request, reply.text, mismatch)
            request_json = canonical_json(request)
            again = await self._send(Call(key_of_json(request_json), request, request_json))
            self.reasks += 1
            if again.unsent:
                exchange.stopped = True  # the run is stopping, or the budget is spent
                break
            exchange.invalid.append(exchange.final)
            exchange.final = again
        return exchange


def stored_result(call: Call, response_id: int, body: str) -> CallResult:
    """The result a reply the store holds gives `call`, with nothing sent or paid."""
    reply, error_class, error = read_stored_reply(body)
    now = utc_now()
    return CallResult(call, now, now, 0.0, [], body, None, reply, error_class, error,
                      stored_id=response_id)
