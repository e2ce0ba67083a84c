"""How the simulator behaves, and what it has received."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimulatorConfig:
    """How the simulator behaves; every rate is a probability per request."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    window: str = "bucket-1s"  # the limits' shape: flow.simulator.limits.SHAPES
    rate_headers: bool = True  # x-ratelimit-* and retry-after, as OpenAI sends them
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    truncate_rate: float = 0.0
    filter_rate: float = 0.0
    hang_s: float = 3600.0
    drip_s: float = 0.05
    outages: list[tuple[float, float]] = field(default_factory=list)
    api_key: str | None = None
    seed: int | None = None


@dataclass
class SimulatorStats:
    """What the simulator received."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_request: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)

    @property
    def max_per_request(self) -> int:
        """The most times any one request arrived."""
        return max(self.by_request.values(), default=0)

    def as_json(self) -> dict[str, Any]:
        """A summary for `GET /sim/stats`."""
        return {"requests": self.requests, "distinct": len(self.by_request),
                "max_per_request": self.max_per_request, "by_model": dict(self.by_model),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "tokens": self.tokens}
