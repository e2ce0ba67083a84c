"""What a worker must share with the plan it works on: each stage's name, model, requests
(templates and parameters) and post steps. `flow plan` records them in the store; a worker
whose pipeline file differs refuses to start and says what differs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

from flow.errors import ConfigError
from flow.stage import Stage

PLAN_KEY = "plan"
_REQUEST_KEYS = {"model", "messages", "params", "when"}  # what a stage's requests are made of


class InfoStore(Protocol):
    """The store's `store_info`, read and written."""

    async def info(self, key: str) -> str | None: ...

    async def set_info(self, key: str, value: str) -> None: ...


def describe(stages: Sequence[Stage], origin: str) -> dict[str, Any]:
    """The plan's shape: what every worker must agree on."""
    return {"origin": origin, "stages": [{
        "name": stage.name, "model": stage.config.model,
        "requests": _digest(stage.config.model_dump(mode="json", include=_REQUEST_KEYS | (
            {"endpoint", "input"} if stage.config.endpoint == "embeddings" else set()))),
        "post": stage.post.fingerprint, "executor": stage.config.executor}
        for stage in stages]}


async def record_plan(store: InfoStore, stages: Sequence[Stage], origin: str) -> None:
    """Write the plan's shape, for workers to check theirs against."""
    await store.set_info(PLAN_KEY, json.dumps(describe(stages, origin), sort_keys=True))


async def check_plan(store: InfoStore, file: str, stages: Sequence[Stage], origin: str) -> None:
    """A `ConfigError` naming what differs when this pipeline is not the one planned."""
    text = await store.info(PLAN_KEY)
    if text is None:
        raise ConfigError(f"{file}: the store has no plan yet: run `flow plan {file}` (on the "
                          "machine with the input) before starting workers")
    planned, mine = json.loads(text), describe(stages, origin)
    differences = []
    if planned["origin"] != mine["origin"]:
        differences.append(f"the endpoint (planned for {planned['origin']}, this file "
                           f"{mine['origin']})")
    names = [s["name"] for s in planned["stages"]], [s["name"] for s in mine["stages"]]
    if names[0] != names[1]:
        differences.append(f"the stages (planned {', '.join(names[0])}; this file "
                           f"{', '.join(names[1])})")
    else:
        for before, now in zip(planned["stages"], mine["stages"]):
            for key, what in (("model", "the model"), ("requests", "the messages or params"),
                              ("post", "the post steps")):
                if before[key] != now[key]:
                    differences.append(f"stage '{now['name']}': {what}")
            # online workers and batch workers on one queue would send a request twice
            if before.get("executor", "online") != now["executor"]:
                differences.append(f"stage '{now['name']}': the executor (planned "
                                   f"{before.get('executor', 'online')}, this file "
                                   f"{now['executor']})")
    if differences:
        raise ConfigError(
            f"{file}: this pipeline differs from the one the store was planned with: "
            + "; ".join(differences) + ". Use the same pipeline file as `flow plan`, or run "
            "`flow plan` again with this one")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
