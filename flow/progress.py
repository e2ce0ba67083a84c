"""What a run in progress looks like: its counters, a rich panel for terminals, plain lines
for logs, and the closing summary.

These only count and build text and renderables; `flow.cli` decides where and when they
are shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flow.execute import BatchCounters, ExecutorCounters
from flow.limiter import LimiterStats

BATCH_FIELDS = ("batches_submitted", "batches_running", "batches_collected", "lines_done",
                "lines_total")


@dataclass
class StageCounts:
    """One stage's items so far in a chain: done, failed, and skipped by its `when:`."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    already_done: int = 0  # done before this run


@dataclass
class RunProgress:
    """Counters of a run in progress, read by the progress display.

    In a chain, `done` and `skipped` count items at the last stage and `failed` items that
    failed at any stage (an item stops at the stage where it fails); `stages` has each
    stage's own counts.
    """

    total: int = 0  # the input's lines (less a CSV header): known before reading it
    rows: int = 0  # rows read so far
    limited: int | None = None  # --limit N stopped the run with work left
    input_read: bool = False
    done: int = 0
    failed: int = 0
    skipped: int = 0
    completed: int = 0
    reused: int = 0  # items whose output came from a stored or shared reply: no call
    truncated: int = 0  # done items made from replies cut short at max_tokens
    rerendered: int = 0
    removed: int = 0
    in_flight: int = 0
    calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cap_usd: float | None = None  # call.max_cost_usd
    spent_before_usd: float = 0.0  # at this endpoint, before this run: counts toward the cap
    started: float = field(default_factory=time.monotonic)
    limits: LimiterStats | None = None
    simulated: bool = False
    stopping: str | None = None
    stages: dict[str, StageCounts] = field(default_factory=dict)
    passed_over: int = 0  # items the last stage's `when:` skipped: finished, neither way
    batches: BatchCounters | None = None  # the Batch API executors' counts, if any

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def observe(self, counters: list[ExecutorCounters], limits: LimiterStats) -> None:
        """Take in the executors' counts (one per stage) and the first limiter's pace."""
        self.calls = sum(c.attempts for c in counters)
        self.retries = sum(c.retries for c in counters)
        self.rate_limited = sum(c.rate_limited for c in counters)
        self.in_flight = sum(c.in_flight for c in counters)
        self.limits = limits
        batches = [c for c in counters if isinstance(c, BatchCounters)]
        if batches:
            self.batches = BatchCounters(**{name: sum(getattr(c, name) for c in batches)
                                            for name in BATCH_FIELDS})

    @property
    def finished(self) -> int:
        """Items at the end of the chain: done, failed at a stage, or skipped at the last."""
        return self.done + self.failed + self.passed_over

    def counts(self) -> dict[str, int]:
        """What the `runs` row records of the run's items and calls."""
        return {"items_total": self.total, "items_done": self.done,
                "items_failed": self.failed, "items_skipped": self.skipped,
                "calls_made": self.calls}


@dataclass
class RunSummary:
    """How a run ended."""

    state: str
    progress: RunProgress
    run_id: int
    store: str
    message: str | None = None


def _count(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:,.0f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate_and_eta(progress: RunProgress) -> tuple[float, float | None]:
    """Items finished by calls per second in this run, and seconds left at that rate."""
    finished = progress.finished
    rate = progress.completed / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
    left = max(0, progress.total - finished)
    eta = left / rate if rate > 0 else None
    return rate, eta


def _limits(progress: RunProgress) -> str:
    limits = progress.limits
    if limits is None:
        return ""
    parts = []
    for now, limit, unit in ((limits.requests_per_min, limits.rpm_limit, "rpm"),
                             (limits.tokens_per_min, limits.tpm_limit, "tpm")):
        if limit is not None:
            parts.append(f"{_count(now)}/{_count(limit)} {unit}")
        elif now:
            parts.append(f"{_count(now)} {unit}")
    if limits.paused_s > 0:
        parts.append(f"paused {limits.paused_s:.1f}s")
    return "  ".join(parts)


def cost_text(progress: RunProgress) -> str:
    """This run's spend, against the cap when there is one, and the run's projected total
    (its spend so far per item finished by a call, times the items left)."""
    text = f"${progress.cost_usd:.4f}"
    if progress.cap_usd is not None:
        spent = progress.spent_before_usd + progress.cost_usd
        text = f"${spent:.2f} of ${progress.cap_usd:.2f}"
    left = max(0, progress.total - progress.finished)
    if progress.completed and left and progress.cost_usd:
        projected = progress.cost_usd * (1 + left / progress.completed)
        text += f" (~${projected:.2f} projected for the run)"
    return text


def describe(progress: RunProgress) -> str:
    """One plain line: counts, rate, ETA, tokens, cost, retries, 429s, failures, limits."""
    rate, eta = rate_and_eta(progress)
    finished = progress.finished
    share = f" {100 * finished / progress.total:.0f}%" if progress.total else ""
    parts = [
        f"{finished:,}/{progress.total:,}{share}",
        f"{rate:.1f} items/s",
        f"ETA {_duration(eta) if eta is not None else '-'}",
        f"tokens {_count(progress.prompt_tokens)} in {_count(progress.completion_tokens)} out",
        cost_text(progress),
        f"calls {progress.calls:,}",
        f"retries {progress.retries:,}",
        f"429s {progress.rate_limited:,}",
        f"failed {progress.failed:,}",
    ]
    if len(progress.stages) > 1:
        parts.append(stage_line(progress))
    if progress.batches is not None:
        parts.append(batch_line(progress))
    limits = _limits(progress)
    if limits:
        parts.append(limits)
    if progress.stopping:
        parts.append(f"[{progress.stopping}]")
    return " | ".join(parts)


def render(progress: RunProgress) -> RenderableType:
    """The live panel for a terminal: a bar and the counters under it."""
    finished = progress.finished
    rate, eta = rate_and_eta(progress)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text("simulated " if progress.simulated else "", style="yellow"),
        ProgressBar(total=max(progress.total, 1), completed=finished, width=40),
        Text(f"{finished:,}/{progress.total:,}", style="bold"),
        Text(f"{rate:.1f}/s", style="cyan"),
        Text(f"ETA {_duration(eta) if eta is not None else '-'}", style="magenta"),
        Text(_duration(progress.elapsed_s), style="dim"),
    )
    detail = Text.assemble(
        ("done ", "dim"), (f"{progress.done:,}", "green"),
        ("  failed ", "dim"), (f"{progress.failed:,}", "red" if progress.failed else "dim"),
        ("  skipped ", "dim"), (f"{progress.skipped:,}", ""),
        ("  in flight ", "dim"), (f"{progress.in_flight}", ""),
        ("  calls ", "dim"), (f"{progress.calls:,}", ""),
        ("  retries ", "dim"), (f"{progress.retries:,}", ""),
        ("  429s ", "dim"), (f"{progress.rate_limited:,}", "yellow" if progress.rate_limited else ""),
        ("  tokens ", "dim"),
        (f"{_count(progress.prompt_tokens)} in / {_count(progress.completion_tokens)} out", ""),
        ("  cost ", "dim"), (cost_text(progress), "bold"),
    )
    lines: list[RenderableType] = [bar, detail]
    if len(progress.stages) > 1:
        lines.append(Text(stage_line(progress), style="dim"))
    if progress.batches is not None:
        lines.append(Text(batch_line(progress), style="cyan"))
    limits = _limits(progress)
    if limits:
        lines.append(Text(f"pace {limits}", style="dim"))
    if progress.stopping:
        lines.append(Text(f"stopping: {progress.stopping}", style="yellow"))
    return Group(*lines)


def batch_line(progress: RunProgress) -> str:
    """The batches: `batches 3 submitted, 1 running, 2 collected; lines 80/120 done`."""
    b = progress.batches
    if b is None:
        return ""
    return (f"batches {b.batches_submitted:,} submitted, {b.batches_running:,} running, "
            f"{b.batches_collected:,} collected; lines {b.lines_done:,}/{b.lines_total:,} done")


def stage_line(progress: RunProgress) -> str:
    """Each stage's counts: `answer 450 done 3 failed · grade 300 done 100 skipped`."""
    parts = []
    for name, counts in progress.stages.items():
        text = f"{name} {counts.done:,} done"
        if counts.failed:
            text += f" {counts.failed:,} failed"
        if counts.skipped:
            text += f" {counts.skipped:,} skipped"
        parts.append(text)
    return " · ".join(parts)


def summarize(summary: RunSummary) -> str:
    """The closing report of a run."""
    p = summary.progress
    lines = [
        f"{summary.state}: {p.done:,} done ({p.skipped:,} already done before), "
        f"{p.failed:,} failed, {p.calls:,} calls, "
        f"tokens {p.prompt_tokens:,} in / {p.completion_tokens:,} out, "
        f"cost ${p.cost_usd:.4f}, {_duration(p.elapsed_s)} wall time",
        f"store: {summary.store}",
    ]
    if len(p.stages) > 1:
        lines.insert(1, f"by stage: {stage_line(p)} (done includes done before)")
    if p.batches is not None:
        lines.insert(1, batch_line(p))
    if p.reused:
        lines.append(f"{p.reused:,} items took their output from a reply already stored or "
                     "bought for another item with the same request: no call, no cost")
    if p.rerendered or p.removed:
        lines.append(f"the input or pipeline changed since the last run: {p.rerendered:,} items "
                     f"now render a different request; {p.removed:,} items whose rows left the "
                     "input were dropped from the results (their calls stay in the store)")
    if p.truncated:
        lines.append(f"{p.truncated:,} replies were cut short at max_tokens: kept as done and "
                     "flagged `truncated` (call.on_truncated: fail fails them instead)")
    if p.limited is not None:
        lines.append(f"--limit {p.limited}: the run stopped there; the items after are left "
                     "pending (exit 0 when nothing failed): run again to go on")
    if p.input_read and p.rows != p.total:
        lines.append(f"{p.rows:,} rows were read from {p.total:,} lines of input (blank lines "
                     "are skipped; a CSV field in quotes can span lines)")
    if p.simulated:
        lines.append("replies were simulated by flow's built-in simulator; "
                     "nothing was sent to a real API")
    if summary.message and summary.state != "finished":
        lines.append(f"note: {summary.message}")
    return "\n".join(lines)
