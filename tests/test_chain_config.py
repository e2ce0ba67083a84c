"""A chain of stages in the pipeline file: defaults inherited, and every mistake a chain can
make refused with the file, the key path and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flow.config import parse_config
from flow.errors import ConfigError


def chain(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "store": "flow.db",
        "load": {"path": "rows.jsonl", "id": "id"},
        "defaults": {"model": "gpt-4o-mini", "concurrency": 8,
                     "params": {"temperature": 0, "max_tokens": 50}},
        "stages": [
            {"name": "answer", "messages": [{"role": "user", "content": "{{ question }}"}],
             "post": ["strip"]},
            {"name": "grade", "model": "gpt-4o", "when": "{{ answer.output | length > 0 }}",
             "messages": [{"role": "user", "content": "Grade {{ answer.output }}"}],
             "params": {"max_tokens": 5}, "post": ["strip"]},
        ],
    }
    config.update(changes)
    return config


def parse(config: dict[str, Any], tmp_path: Path) -> Any:
    return parse_config(yaml.safe_dump(config), tmp_path / "pipeline.yaml")


def error(config: dict[str, Any], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(config, tmp_path)
    return str(caught.value)


def test_stages_inherit_defaults_and_merge_params(tmp_path: Path) -> None:
    answer, grade = parse(chain(), tmp_path).chain
    assert (answer.name, answer.model, answer.concurrency) == ("answer", "gpt-4o-mini", 8)
    assert answer.params == {"temperature": 0, "max_tokens": 50}
    assert (grade.model, grade.params) == ("gpt-4o", {"temperature": 0, "max_tokens": 5})
    assert grade.when == "{{ answer.output | length > 0 }}" and answer.when is None


def test_the_one_stage_form_is_a_chain_of_one_stage_named_call(tmp_path: Path) -> None:
    config = {"store": "flow.db", "load": {"path": "rows.jsonl"},
              "call": {"model": "m", "messages": [{"role": "user", "content": "{{ q }}"}]},
              "post": ["strip"]}
    (stage,) = parse(config, tmp_path).chain
    assert (stage.name, stage.model, stage.post) == ("call", "m", ["strip"])


def test_a_template_naming_a_later_stage_is_refused(tmp_path: Path) -> None:
    config = chain()
    config["stages"][0]["messages"][0]["content"] = "{{ question }} {{ grade.output }}"
    message = error(config, tmp_path)
    assert "pipeline.yaml: stages[0].messages[0].content: names 'grade', a later stage" in message


def test_a_stage_naming_itself_is_refused(tmp_path: Path) -> None:
    config = chain()
    config["stages"][1]["when"] = "{{ grade.output }}"
    assert "stages[1].when: names 'grade', this stage" in error(config, tmp_path)


def test_a_duplicate_stage_name_is_refused(tmp_path: Path) -> None:
    config = chain()
    config["stages"][1]["name"] = "answer"
    assert "stages[1].name: 'answer' is already the name of stages[0]" in error(config, tmp_path)


@pytest.mark.parametrize("when", ["{{ answer.output | length > }}", "answer.output ===",
                                  "{{ answer.output"])
def test_a_when_that_does_not_parse_is_refused(when: str, tmp_path: Path) -> None:
    config = chain()
    config["stages"][1]["when"] = when
    assert "stages[1].when: not a valid expression" in error(config, tmp_path)


def test_a_name_templates_cannot_use_is_refused(tmp_path: Path) -> None:
    config = chain()
    config["stages"][0]["name"] = "the answer"
    assert "stages[0].name" in error(config, tmp_path)


def test_run_wide_keys_must_agree_between_stages(tmp_path: Path) -> None:
    config = chain()
    config["stages"][1]["max_cost_usd"] = 5
    message = error(config, tmp_path)
    assert "stages[1].max_cost_usd: differs from stages[0]" in message and "defaults:" in message


def test_call_and_stages_together_are_refused(tmp_path: Path) -> None:
    config = chain(call={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert "a pipeline has `call:` and `post:`, or `stages:`" in error(config, tmp_path)


def test_an_unknown_default_key_is_named(tmp_path: Path) -> None:
    config = chain()
    config["defaults"]["concurency"] = 4
    assert "defaults.concurency: unknown key" in error(config, tmp_path)


def test_an_unknown_stage_key_is_named_with_its_path(tmp_path: Path) -> None:
    config = chain()
    config["stages"][1]["wen"] = "{{ 1 }}"
    message = error(config, tmp_path)
    assert "stages[1].wen: unknown key; did you mean 'when'?" in message


def test_a_pipeline_without_call_or_stages_says_what_is_missing(tmp_path: Path) -> None:
    config = chain()
    del config["stages"], config["defaults"]
    assert "call: required key is missing (or `stages:`" in error(config, tmp_path)


def test_a_bad_chain_exits_2_through_the_cli(tmp_path: Path, capsys: Any) -> None:
    from flow.cli import main

    config = chain()
    config["stages"][0]["messages"][0]["content"] = "{{ grade.output }}"
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "pipeline.yaml"), "--simulate"]) == 2
    assert "names 'grade', a later stage" in capsys.readouterr().err
