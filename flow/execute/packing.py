"""The embeddings executor: many items' calls packed into one request, a vector each back.

Each item keeps its own call (its key names its text, so identical texts are one call and a
re-run finds what is stored); `concurrency` workers each take up to `inputs_per_request`
calls, within OpenAI's limits (2,048 inputs, 300,000 tokens a request; an input over 8,192
tokens fails alone, unsent), and send them as one request through the online executor's
`call` (its limiter, retries and error tree); an empty input fails alone, unsent, too.
The reply is split by `index`: each item gets its vector and its share of the request's
tokens (by length, in whole tokens that add up to the request's), so the costs of its items
add up to the request's cost. A request refused as a whole (400, 413, 422) is split in
halves and sent again, down to the one input at fault, which fails alone with the server's
reason; unless the refusal names another part of the request than its inputs (its `param`:
`model`, `dimensions`, ...), a fault every half would share: then each of its items fails
with it at once, and nothing more is sent for them.

A source that knows no more calls are coming for now (a worker whose claim is all handed
out, with the rest of the queue held by others) yields `FLUSH`: the calls gathered so far
go as they are, rather than wait for calls that may come only once they are sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from dataclasses import replace

from flow.config import CallConfig
from flow.endpoints import embeddings
from flow.execute import FLUSH, Deliver, ExecutorCounters
from flow.execute.online import OnlineExecutor
from flow.records import Call, CallResult, Reply, Usage, utc_now
from flow.tokens import count_text_tokens

SPLIT_STATUS = frozenset({400, 413, 422})  # the request as a whole was refused
VECTOR_BYTES_MAX = 3072 * 4 * 4 // 3 + 64  # the largest vector, in base64 JSON
COUNT_OVER = 512  # an input longer than this many bytes is counted with the tokenizer
_END = Call("", {}, "")  # the source has no call left


def packed_config(config: CallConfig) -> CallConfig:
    """The stage's call settings for sending packs: a reply may be as large as its inputs'
    vectors in base64 (2,048 of 3,072 floats is 33 MB), whatever `max_response_bytes` says."""
    largest = config.inputs_per_request * VECTOR_BYTES_MAX + 1_000_000
    return config.model_copy(update={
        "max_response_bytes": max(config.max_response_bytes, largest)})


class PackingExecutor:
    """Sends an embeddings stage's calls, `inputs_per_request` to a request."""

    def __init__(self, config: CallConfig, online: OnlineExecutor) -> None:
        self._config = config
        self._online = online
        self._held: Call | None = None  # a call that did not fit in the last pack

    @property
    def counters(self) -> ExecutorCounters:
        """The online executor's counts (attempts are requests, in flight are items)."""
        return self._online.counters

    async def execute(self, calls: AsyncIterable[Call | None], deliver: Deliver) -> None:
        """Pack the calls and send them with `concurrency` workers; each item's result is
        delivered once its request's reply is in. A `FLUSH` in `calls` ends a pack."""
        source = aiter(calls)
        turn = asyncio.Lock()

        async def next_pack() -> list[Call] | None:
            async with turn:  # one worker gathers at a time: packs are whole
                return await self._gather(source, deliver)

        async def work() -> None:
            while (pack := await next_pack()) is not None:
                self.counters.in_flight += len(pack)
                try:
                    results = await self.send(pack)
                finally:
                    self.counters.in_flight -= len(pack)
                await asyncio.gather(*(deliver(result) for result in results))

        workers = [asyncio.create_task(work()) for _ in range(self._config.concurrency)]
        try:
            for finished in asyncio.as_completed(workers):
                await finished
            if self._online.out_of_files is not None:
                raise self._online.out_of_files
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _gather(self, source: AsyncIterable[Call | None],
                      deliver: Deliver) -> list[Call] | None:
        """The next pack: calls in order while they fit, up to a `FLUSH`; None when no call
        is left."""
        pack: list[Call] = []
        tokens = 0
        iterator = aiter(source)
        while len(pack) < self._config.inputs_per_request:
            call = self._held or await anext(iterator, _END)
            self._held = None
            if call is _END or (call is FLUSH and pack):
                break
            if call is None:  # a flush with nothing gathered: wait for the next call
                continue
            if not call.request["input"]:
                await deliver(_failed(call, "InputEmptyError", "the input is empty, and an "
                                      "empty text has no embedding; nothing was sent"))
                continue
            needed = self._tokens(call)
            if needed > embeddings.MAX_INPUT_TOKENS:
                await deliver(_failed(call, "InputTooLongError",
                                      f"the input is {needed:,} tokens, more than the "
                                      f"{embeddings.MAX_INPUT_TOKENS:,} an embedding input may "
                                      "have; shorten it (call.input), nothing was sent"))
                continue
            if pack and tokens + needed > embeddings.MAX_REQUEST_TOKENS:
                self._held = call  # the first of the next pack
                break
            pack.append(call)
            tokens += needed
        return pack or None

    def _tokens(self, call: Call) -> int:
        """The input's tokens: its bytes (a bound) when short, else counted."""
        text = call.request["input"]
        bound = embeddings.token_bound(text)
        if bound <= COUNT_OVER:
            return bound
        return count_text_tokens([text], call.request["model"])[0]

    async def send(self, pack: list[Call]) -> list[CallResult]:
        """Send one pack; each item's result (halves sent again when the whole is refused)."""
        request, request_json = embeddings.packed_request([c.request for c in pack])
        key = embeddings.pack_key(request_json)
        result = await self._online.call(Call(key, request, request_json))
        status = result.attempts[-1].status_code if result.attempts else None
        if (result.reply is None and status in SPLIT_STATUS and len(pack) > 1
                and _inputs_at_fault(result.refused_param)):
            half = len(pack) // 2
            first, second = await asyncio.gather(self.send(pack[:half]), self.send(pack[half:]))
            return first + second
        return _split(result, pack, key)


def _inputs_at_fault(param: str | None) -> bool:
    """Whether a refusal may be some inputs' (`input`, `$.input[3]`, `input.3`, or not
    said: OpenAI names no param for many refusals)."""
    return not param or param.lstrip("$.").split("[", 1)[0].split(".", 1)[0] == "input"


def _split(result: CallResult, pack: list[Call], key: str) -> list[CallResult]:
    """Each item's result from its pack's: its vector and its share of the tokens; or the
    pack's failure (a paid, unusable reply is kept once, with the first item)."""
    items = [replace(result, call=call, body=None, usage=None, reply=None,
                     attempts=list(result.attempts)) for call in pack]
    if result.unsent or result.reply is None or result.body is None:
        items[0].body, items[0].usage = result.body, result.usage
        return items
    try:
        vectors, _ = embeddings.parse_packed(result.body, len(pack))
    except Exception as e:  # a 200 whose vectors cannot be read: paid, kept, failed
        items[0].body, items[0].usage = result.body, result.usage
        for failed in items:
            failed.error_class, failed.error = "ResponseError", str(e)
        return items
    total = result.usage.prompt_tokens if result.usage is not None else 0
    shares = embeddings.split_tokens(total, [len(c.request["input"]) for c in pack])
    model = str(result.call.request["model"])
    for index, (done, vector, share) in enumerate(zip(items, vectors, shares)):
        dimensions = len(vector) // 4
        done.vector = vector
        done.usage = Usage(share) if result.usage is not None else None
        done.reply = Reply(embeddings.output_text(dimensions), "stop")
        done.body = embeddings.item_body(model, dimensions, share, key, index, len(pack))
    return items


def _failed(call: Call, error_class: str, error: str) -> CallResult:
    """An item that fails before it is sent."""
    now = utc_now()
    return CallResult(call, now, now, 0.0, [], error_class=error_class, error=error)
