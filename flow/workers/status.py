"""What `flow status` says of the workers on a shared store: each live one's rate and
leases, and the queue (each stage's, for a chain)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

WORKERS_SQL = """
    SELECT runs.id, runs.worker, runs.started_at, runs.state,
        (SELECT COUNT(*) FROM outputs WHERE outputs.run_id = runs.id),
        (SELECT COUNT(*) FROM work WHERE work.worker = runs.worker AND work.state = 'leased'
            AND work.lease_until >= now()),
        EXTRACT(EPOCH FROM now() - runs.heartbeat_at)
    FROM runs WHERE runs.worker IS NOT NULL AND runs.endpoint <> 'plan'
        AND runs.state = 'running'
    ORDER BY runs.id"""
QUEUE_SQL = """
    SELECT stage, COUNT(*) FILTER (WHERE state = 'pending'),
        COUNT(*) FILTER (WHERE state = 'leased' AND lease_until >= now()),
        COUNT(*) FILTER (WHERE state = 'leased' AND lease_until < now()),
        COUNT(*) FILTER (WHERE state = 'done')
    FROM work GROUP BY stage ORDER BY MIN(seq)"""
QUEUE_COUNTS = ("pending", "leased", "lease_expired", "done")


def worker_status(db: Any) -> dict[str, Any]:
    """The live workers (items per second since each started, leases held) and the queue."""
    now = datetime.now(UTC)
    workers = []
    for run_id, name, started_at, state, outputs, leases, quiet_s in db.execute(
            WORKERS_SQL).fetchall():
        started = datetime.fromisoformat(started_at.replace("Z", "+00:00"))
        elapsed = max((now - started).total_seconds(), 1e-3)
        workers.append({"run": run_id, "worker": name, "state": state, "items": outputs,
                        "items_per_s": round(outputs / elapsed, 2), "leases": leases,
                        "heartbeat_s_ago": None if quiet_s is None else round(float(quiet_s), 1)})
    stages = [{"stage": stage, **dict(zip(QUEUE_COUNTS, counts))}
              for stage, *counts in db.execute(QUEUE_SQL).fetchall()]
    queue: dict[str, Any] = {name: sum(s[name] for s in stages) for name in QUEUE_COUNTS}
    if len(stages) > 1:  # a chain: each stage's share, in the order they were first queued
        queue["stages"] = stages
    return {"workers": workers, "queue": queue}
