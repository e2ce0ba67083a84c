"""The plain records that pass between stages: what is called, what came back, what is kept.

No stage imports the store to get a record type; the store imports these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STAGE = "call"  # the stage of a pipeline of one `call:`; a chain names its own stages

_second: list[Any] = [-1, ""]


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds (`2026-11-25T04:10:33.509Z`)."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        # formatted once a second: this runs several times per request
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


@dataclass(slots=True)
class ItemRecord:
    """One input row as the store keeps it: where it is, what it renders to, or why it failed."""

    item_id: str
    row: int
    input: str | None
    request_key: str | None
    error_class: str | None = None
    error: str | None = None
    skipped: bool = False  # `when:` was false at this stage
    stopped_at: str | None = None  # the earlier stage whose failure stopped the item

    def stored(self, origin: str) -> tuple[Any, ...]:
        """What the store's `items` row holds of it, to tell whether it changed."""
        return (self.row, self.request_key, origin, self.error_class, self.error, self.input,
                int(self.skipped), self.stopped_at)


@dataclass(slots=True)
class Call:
    """One distinct request to send: its content key, the request and its canonical JSON."""

    key: str
    request: dict[str, Any]
    request_json: str


@dataclass(slots=True)
class Usage:
    """Tokens a reply was billed for."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def plus(self, other: Usage | None) -> Usage:
        """The tokens of both."""
        if other is None:
            return self
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens,
                     self.cached_tokens + other.cached_tokens)


@dataclass(slots=True)
class Reply:
    """A usable reply: the text post steps start from, and why the model stopped."""

    text: str
    finish_reason: str

    @property
    def truncated(self) -> bool:
        """Cut short at `max_tokens`: kept, and flagged."""
        return self.finish_reason == "length"


@dataclass(slots=True)
class Attempt:
    """One HTTP attempt of a call."""

    number: int
    started_at: str
    latency_ms: float
    status_code: int | None
    outcome: str
    error: str | None = None
    wait_s: float | None = None


@dataclass(slots=True)
class CallResult:
    """How a call ended: the paid reply's body (if one came), or why there is none."""

    call: Call
    started_at: str
    finished_at: str
    latency_ms: float
    attempts: list[Attempt]
    body: str | None = None
    usage: Usage | None = None
    reply: Reply | None = None
    error_class: str | None = None
    error: str | None = None
    unsent: bool = False  # the run stopped before it was sent: its items stay pending
    batch_id: str | None = None  # it came through this Batch API batch (at batch prices)
    stored_id: int | None = None  # a reply the store held already: read, not bought
    vector: bytes | None = None  # an embedding: little-endian float32
    refused_param: str | None = None  # a refusal's `param`: the part of the request at fault


@dataclass(slots=True)
class ResponseRecord:
    """A paid reply as the store keeps it, once, with its tokens and cost."""

    request_key: str
    origin: str
    model: str
    request_json: str
    body: str
    usage: Usage
    cost_usd: float | None
    attempts: int
    latency_ms: float
    started_at: str
    finished_at: str
    id: int | None = None
    batch_id: str | None = None  # the Batch API batch it came through; None: sent online
    vector: bytes | None = None  # an embedding: little-endian float32, kept in `vectors`


@dataclass(slots=True)
class OutputRecord:
    """What one item of one stage became: its output, or why it failed."""

    item_id: str
    request_key: str
    status: str
    post_key: str
    output: str | None = None
    error_class: str | None = None
    error: str | None = None
    response_id: int | None = None
    bought: bool = False
    attempts: int = 0
    truncated: bool = False  # made from a reply cut short at max_tokens


@dataclass(slots=True)
class Settled:
    """One unit the store commits at once: a call's paid reply, its attempts, its items."""

    stage: str
    origin: str
    call_key: str
    finished_at: str
    response: ResponseRecord | None
    attempts: list[Attempt]
    outputs: list[OutputRecord]
    # replies whose paying item may have changed (an item moved to another reply):
    # the store gives each one's cost to one current output again
    reassign: list[int] = field(default_factory=list)
    # a worker's result on a shared store: the fencing token of its lease on the request;
    # `rejected` when another worker held the lease by the commit (the reply is kept, unused)
    lease: int | None = None
    rejected: bool = False


@dataclass(slots=True)
class Known:
    """What the store holds for one item at one endpoint: its output, and its request's reply.

    `output_key` is the request the stored output was made from (None: no output yet),
    `response_id` the reply it was made from and `bought` whether this item paid for it;
    `reply_id` is the latest paid reply to the item's current request, from any item.
    """

    output_key: str | None = None
    post_key: str | None = None
    status: str | None = None
    error_class: str | None = None
    response_id: int | None = None
    bought: bool = False
    reply_id: int | None = None
    # asked for when a later stage renders from the output: its JSON, and why it failed
    output: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Shard:
    """A group of calls sent through the Batch API as one batch, and where it stands:
    planned -> uploaded -> creating -> submitted -> terminal -> collected."""

    id: int
    stage: str
    origin: str
    endpoint: str
    state: str
    lines: int
    bytes: int
    worst_cost_usd: float | None = None
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the Batch API's own: in_progress, completed, expired, ...
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    updated_at: str = ""
