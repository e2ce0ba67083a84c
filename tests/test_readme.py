"""Every pipeline the README shows runs green under `--simulate`: each item ends `done`.

A pipeline is a YAML block of the README with `load` and `call`, or a pipeline file that one of
its commands runs (`flow pipeline.yaml`). Each runs in a folder of its own, with the first rows
of the data file it names from the repository, a module for each `python:` step it names, and
a value for each `${VAR}` it needs.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from flow.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ROWS = 5
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMAND_FILE = re.compile(r"\bflow (?:run )?([\w./-]+\.ya?ml)\b")
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(:-[^}]*)?\}")
IDENTITY_STEP = '''def {name}(value):
    """A post step: value in, value out."""
    return value
'''


def readme_pipelines() -> list[tuple[str, str]]:
    """(where, YAML text) of every pipeline the README shows or runs."""
    found: list[tuple[str, str]] = []
    files: list[str] = []
    for number, (language, text) in enumerate(BLOCK.findall(README.read_text("utf-8")), 1):
        if language == "yaml":
            config = yaml.safe_load(text)
            if isinstance(config, dict) and "load" in config and ({"call", "stages"} & set(config)):
                found.append((f"README block {number}", text))
        elif language == "sh":
            files += [name for name in COMMAND_FILE.findall(text) if name not in files]
    for name in files:
        path = ROOT / name
        assert path.is_file(), f"the README runs {name}, which the repository does not ship"
        found.append((name, path.read_text("utf-8")))
    return found


PIPELINES = readme_pipelines()


def test_the_readme_shows_pipelines_in_blocks_and_runs_pipeline_files() -> None:
    wheres = [where for where, _ in PIPELINES]
    assert any(w.startswith("README block") for w in wheres) and "pipeline.yaml" in wheres


@pytest.mark.parametrize(("where", "text"), PIPELINES, ids=[where for where, _ in PIPELINES])
def test_a_readme_pipeline_runs_green_under_simulate(where: str, text: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name, default in VARIABLE.findall(text):
        if default:
            monkeypatch.delenv(name, raising=False)  # the example's own default applies
        else:
            monkeypatch.setenv(name, f"readme-{name.lower()}")
    # a pipeline file in a folder (examples/) reads its data from where it sits
    inside = Path(where).parent if not where.startswith("README") else Path()
    file = tmp_path / inside / "pipeline.yaml"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text, encoding="utf-8")
    config: dict[str, Any] = yaml.safe_load(text)
    _copy_rows(str(inside / config["load"]["path"]), tmp_path)
    stages = config.get("stages") or [{"name": "call", "post": config.get("post", [])}]
    for step in (step for stage in stages for step in stage.get("post", [])):
        if isinstance(step, dict) and "python" in step:
            _write_step(step["python"], file.parent)

    assert main(["run", str(file), "--simulate"]) == 0
    with sqlite3.connect(file.parent / config["store"]) as db:
        statuses = db.execute("SELECT stage, item_id, status, error FROM results").fetchall()
    assert len(statuses) == ROWS * len(stages)
    assert [row for row in statuses if row[2] != "done"] == []


def _copy_rows(name: str, folder: Path) -> None:
    """The first rows of the repository's data file `name`, at the same place in `folder`."""
    source = (ROOT / name).resolve()
    assert source.is_file(), f"the pipeline reads {name}, which the repository does not ship"
    target = (folder / name).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open(encoding="utf-8") as rows, target.open("w", encoding="utf-8") as out:
        lines = rows.readlines()
        out.writelines(lines[:ROWS + 1] if source.suffix == ".csv" else lines[:ROWS])


def _write_step(target: str, folder: Path) -> None:
    """A module for a `python: package.module:function` step that passes its value on."""
    module, _, function = target.partition(":")
    *packages, leaf = module.split(".")
    where = folder.joinpath(*packages)
    where.mkdir(parents=True, exist_ok=True)
    for depth in range(len(packages)):
        (folder.joinpath(*packages[:depth + 1]) / "__init__.py").touch()
    (where / f"{leaf}.py").write_text(IDENTITY_STEP.format(name=function), encoding="utf-8")


def test_the_readme_shows_every_pipeline_key_and_command() -> None:
    from flow.cli import COMMANDS
    from flow.config.models import (
        CallConfig,
        LoadConfig,
        PipelineConfig,
        RetryConfig,
        StageConfig,
    )

    text = README.read_text("utf-8")
    keys = [key for model in (PipelineConfig, LoadConfig, CallConfig, RetryConfig, StageConfig)
            for name, field in model.model_fields.items() for key in [field.alias or name]]
    assert [key for key in keys if f"{key}:" not in text] == []
    assert [command for command in COMMANDS if f"flow {command} " not in text] == []
    options = ("--simulate", "--limit", "--retry-failed", "--error-class", "--recall",
               "--take-over-store", "--no-input", "--stage", "--dry-run", "--detach")
    assert [option for option in options if option not in text] == []
