"""How the simulator behaves, and what it has received."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# the limits every answer reports unless told otherwise, as real servers always send theirs:
# OpenAI's top tier for its small models (150M tokens a minute), and requests far above what
# the simulator can serve (about 7,000 a second), so they never bind unless set lower
DEFAULT_RPM = 600_000
DEFAULT_TPM = 150_000_000
BATCH_FAULT = re.compile(r"(expire|cancel):\d+|fail-validation(:\d+)?|token-limit|drop-create")


@dataclass
class SimulatorConfig:
    """How the simulator behaves; every rate is a probability per request."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rpm: int | None = DEFAULT_RPM  # None: no limit, and no headers for it
    tpm: int | None = DEFAULT_TPM
    window: str = "bucket-1s"  # the limits' shape: flow.simulator.limits.SHAPES
    rate_headers: bool = True  # x-ratelimit-* and retry-after, as OpenAI sends them
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    truncate_rate: float = 0.0
    filter_rate: float = 0.0
    schema_break_rate: float = 0.0  # replies that break their json_schema (a first ask's)
    schema_rebreak_rate: float = 0.0  # re-asks' replies that break it again
    hang_s: float = 3600.0
    drip_s: float = 0.05
    outages: list[tuple[float, float]] = field(default_factory=list)
    api_key: str | None = None
    seed: int | None = None
    # the Batch API (flow.simulator.batches): seconds on the simulated clock a batch takes
    batch_s: float = 2.0
    batch_faults: dict[int, str] = field(default_factory=dict)  # by create number, from 1
    batch_token_limit: int | None = None  # enqueued tokens per model
    batch_shuffle: bool = True  # output lines in a seeded shuffled order, as OpenAI's are not


@dataclass
class SimulatorStats:
    """What the simulator received."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_request: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)
    batch_creates: Counter[str] = field(default_factory=Counter)  # by metadata shard or file
    batch_lines: int = 0
    files_uploaded: int = 0
    # the most requests admitted within one window of a sliding or fixed request limit
    window_peak: int = 0
    schema_broken: int = 0  # replies made to break their json_schema
    embedded_inputs: int = 0  # inputs of embeddings requests answered or refused
    waiting: int = 0  # chat requests in their latency now
    most_waiting: int = 0  # the most at once: how many a client had out together

    @property
    def max_per_request(self) -> int:
        """The most times any one request arrived."""
        return max(self.by_request.values(), default=0)

    def as_json(self) -> dict[str, Any]:
        """A summary for `GET /sim/stats`."""
        return {"requests": self.requests, "distinct": len(self.by_request),
                "max_per_request": self.max_per_request, "by_model": dict(self.by_model),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "tokens": self.tokens, "batch_creates": dict(self.batch_creates),
                "batch_lines": self.batch_lines, "files_uploaded": self.files_uploaded,
                "window_peak": self.window_peak, "schema_broken": self.schema_broken,
                "embedded_inputs": self.embedded_inputs}


def check_batch_fault(text: str) -> str:
    """`text` if it is a batch fault `batch_faults` takes, else ValueError."""
    if not BATCH_FAULT.fullmatch(text):
        raise ValueError(f"unknown batch fault {text!r}; expected expire:N, cancel:N, "
                         "fail-validation[:LINE], token-limit or drop-create")
    return text
