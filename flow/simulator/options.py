"""The simulator's behaviour as command-line options, for `flow simulate` and `flow run --simulate`."""

from __future__ import annotations

import argparse
from typing import Any

from flow.simulator.config import DEFAULT_RPM, DEFAULT_TPM, SimulatorConfig, check_batch_fault
from flow.simulator.limits import ALIASES, SHAPES


def add_simulator_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    """The simulator's behaviour as options, named `--{prefix}latency-ms` and so on."""
    group = parser.add_argument_group("simulator" if prefix else "behaviour")
    floats = {"latency-ms": "reply latency", "jitter-ms": "extra random latency, at most",
              "error-rate": "share of requests answered 500",
              "rate-limit-rate": "share answered 429 regardless of limits",
              "drop-rate": "share whose connection is dropped",
              "hang-rate": "share that never answer", "malformed-rate": "share with a broken body",
              "truncate-rate": "share cut short (finish_reason length)",
              "filter-rate": "share withheld (finish_reason content_filter)",
              "schema-break-rate": "share of json_schema replies that break the schema "
                                   "(a first ask's)",
              "schema-rebreak-rate": "share of re-asks' replies that break it again"}
    for name, text in floats.items():
        group.add_argument(f"--{prefix}{name}", type=_non_negative_float, default=0.0, help=text)
    group.add_argument(f"--{prefix}rpm", type=positive_int, default=DEFAULT_RPM,
                       help=f"requests per minute allowed (default {DEFAULT_RPM:,}, far above "
                            "what the simulator can serve: its headers say so, as a real "
                            "server's do)")
    group.add_argument(f"--{prefix}tpm", type=positive_int, default=DEFAULT_TPM,
                       help=f"tokens per minute allowed (default {DEFAULT_TPM:,}, OpenAI's top "
                            "tier for its small models)")
    group.add_argument(f"--{prefix}window", choices=(*SHAPES, *ALIASES), default="bucket-1s",
                       help="the shape of the limits: a token bucket of 1 s or of 60 s (full at "
                            "the start), a sliding window of 1 s or 60 s, or fixed 60 s windows "
                            "(second = bucket-1s, minute = fixed-60s)")
    group.add_argument(f"--{prefix}no-rate-headers", action="store_true",
                       help="send no x-ratelimit-* or retry-after headers, as many "
                            "OpenAI-compatible servers do (limits are still enforced)")
    group.add_argument(f"--{prefix}outage", action="append", default=[], type=_outage,
                       metavar="START:END", help="answer every request 503 from START to END "
                       "seconds after the simulator starts (repeatable)")
    group.add_argument(f"--{prefix}batch-s", type=_non_negative_float, default=2.0,
                       help="simulated seconds a batch takes to run its lines (default 2)")
    group.add_argument(f"--{prefix}batch-fault", action="append", default=[], type=_batch_fault,
                       metavar="N=FAULT", help="make the Nth batch create (from 1) meet FAULT: "
                       "expire:LINES, cancel:LINES, fail-validation[:LINE], token-limit or "
                       "drop-create (repeatable)")
    group.add_argument(f"--{prefix}batch-token-limit", type=positive_int,
                       help="enqueued batch tokens per model beyond which a batch fails "
                            "with token_limit_exceeded")
    group.add_argument(f"--{prefix}no-batch-shuffle", action="store_true",
                       help="write batch output lines in input order (default: shuffled)")
    if not prefix:
        group.add_argument("--api-key", help="refuse requests without this key (401)")
        group.add_argument("--seed", type=int, help="seed for the injected faults")


def simulator_config(args: argparse.Namespace, prefix: str) -> SimulatorConfig:
    """The `SimulatorConfig` those options describe."""

    def get(name: str) -> Any:
        return getattr(args, (prefix + name).replace("-", "_"))

    return SimulatorConfig(
        latency_ms=get("latency-ms"), jitter_ms=get("jitter-ms"), rpm=get("rpm"), tpm=get("tpm"),
        window=get("window"), rate_headers=not get("no-rate-headers"),
        error_rate=get("error-rate"),
        rate_limit_rate=get("rate-limit-rate"), drop_rate=get("drop-rate"),
        hang_rate=get("hang-rate"), malformed_rate=get("malformed-rate"),
        truncate_rate=get("truncate-rate"), filter_rate=get("filter-rate"),
        schema_break_rate=get("schema-break-rate"),
        schema_rebreak_rate=get("schema-rebreak-rate"),
        outages=get("outage"), batch_s=get("batch-s"), batch_faults=dict(get("batch-fault")),
        batch_token_limit=get("batch-token-limit"), batch_shuffle=not get("no-batch-shuffle"),
        api_key=getattr(args, "api_key", None), seed=getattr(args, "seed", None))


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def _batch_fault(text: str) -> tuple[int, str]:
    number, _, fault = text.partition("=")
    try:
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"expected N=FAULT with N a create's number from 1, got {text!r}")
        return int(number), check_batch_fault(fault)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _outage(text: str) -> tuple[float, float]:
    start, _, end = text.partition(":")
    try:
        window = float(start), float(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}") from None
    if not 0 <= window[0] < window[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return window


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {value}")
    return value
