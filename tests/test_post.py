"""Post steps turn response text into output."""

from __future__ import annotations

from pathlib import Path

import pytest

from flow.errors import ConfigError, PostError
from flow.post import PostProcessor


def test_strip_then_json() -> None:
    assert PostProcessor(["strip", "json"], Path()).apply('  {"a": 1}\n') == {"a": 1}


def test_json_accepts_a_fenced_block() -> None:
    assert PostProcessor(["json"], Path()).apply('```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}


def test_json_failure_says_why() -> None:
    with pytest.raises(PostError, match="post step json: not valid JSON"):
        PostProcessor(["json"], Path()).apply("not json")


def test_regex_returns_the_first_group_or_the_match() -> None:
    assert PostProcessor([{"regex": r"answer: (\d+)"}], Path()).apply("the answer: 42") == "42"
    assert PostProcessor([{"regex": r"\d+"}], Path()).apply("x 7 y") == "7"
    with pytest.raises(PostError, match="no match"):
        PostProcessor([{"regex": r"\d+"}], Path()).apply("none")


def test_bad_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"post\[0\].regex: invalid regular expression"):
        PostProcessor([{"regex": "("}], Path())


def test_python_step_loads_the_users_function(tmp_path: Path) -> None:
    (tmp_path / "my_steps.py").write_text(
        "def words(text):\n    return len(text.split())\n"
        "def boom(text):\n    raise ValueError('bad text')\n")
    assert PostProcessor(["strip", {"python": "my_steps:words"}], tmp_path).apply(" a b c ") == 3
    with pytest.raises(PostError, match="post step python my_steps:boom: ValueError: bad text"):
        PostProcessor([{"python": "my_steps:boom"}], tmp_path).apply("x")


def test_python_step_that_cannot_load_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        PostProcessor([{"python": "no_such_module:f"}], tmp_path)
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        PostProcessor([{"python": "no_colon"}], tmp_path)


def test_fingerprint_changes_with_the_steps() -> None:
    assert PostProcessor(["strip"], Path()).fingerprint != PostProcessor(["json"], Path()).fingerprint
