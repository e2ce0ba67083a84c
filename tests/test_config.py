"""The pipeline file: every mistake gets one message naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from flow.config import load_config, parse_config
from flow.errors import ConfigError

VALID = """
store: out/flow.db
load: {path: rows.jsonl, id: id}
call:
  model: gpt-4o-mini
  messages:
    - {role: user, content: "{{ question }}"}
post: [strip, json, {regex: "(\\\\d+)"}]
"""


def config_error(text: str, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "pipeline.yaml")
    return str(caught.value)


def test_valid_file_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "pipeline.yaml").write_text(VALID)
    config = load_config(tmp_path / "pipeline.yaml")
    assert config.store == tmp_path / "out" / "flow.db"
    assert config.load.path == tmp_path / "rows.jsonl"
    assert config.load.resolved_format == "jsonl"
    assert config.call.concurrency == 32 and config.call.retry.max_tries == 8
    assert config.file == tmp_path / "pipeline.yaml"


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: no such pipeline file"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    message = config_error("store: a.db\nload: [unclosed\n", tmp_path)
    assert "pipeline.yaml: invalid YAML at line" in message


def test_unknown_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    message = config_error(VALID.replace("model: gpt-4o-mini", "model: x\n  modle: y"), tmp_path)
    assert "call.modle: unknown key" in message
    assert "concurrency" in message and "messages" in message


def test_wrong_type_names_the_key_path_and_value(tmp_path: Path) -> None:
    message = config_error(VALID.replace("model: gpt-4o-mini",
                                         "model: gpt-4o-mini\n  concurrency: lots"), tmp_path)
    assert "call.concurrency" in message and "'lots'" in message


def test_missing_required_key(tmp_path: Path) -> None:
    message = config_error(VALID.replace("store: out/flow.db\n", ""), tmp_path)
    assert "store: required key is missing" in message


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    text = VALID.replace("model: gpt-4o-mini", "model: m\n  timeout_s: -1\n  retry: {max_tries: 0}")
    message = config_error(text, tmp_path)
    assert "call.timeout_s" in message and "call.retry.max_tries" in message


def test_message_role_must_be_known(tmp_path: Path) -> None:
    message = config_error(VALID.replace("role: user", "role: robot"), tmp_path)
    assert "call.messages[0].role" in message


def test_reserved_params_are_refused(tmp_path: Path) -> None:
    text = VALID.replace("model: gpt-4o-mini", "model: m\n  params: {model: other}")
    assert "cannot be a param" in config_error(text, tmp_path)


def test_unknown_post_step(tmp_path: Path) -> None:
    message = config_error(VALID.replace("[strip, json,", "[strip, jsno,"), tmp_path)
    assert "post" in message and "unknown step 'jsno'" in message


def test_env_vars_are_substituted_with_defaults(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_MODEL", "gpt-5-mini")
    text = VALID.replace("model: gpt-4o-mini", "model: ${FLOW_MODEL}\n  concurrency: ${C:-7}\n"
                         "  api_key: $${LITERAL}")
    config = parse_config(text, tmp_path / "pipeline.yaml")
    assert config.call.model == "gpt-5-mini"
    assert config.call.concurrency == 7
    assert config.call.api_key == "${LITERAL}"


def test_unset_env_var_without_default_names_key_and_variable(tmp_path: Path) -> None:
    text = VALID.replace("model: gpt-4o-mini", "model: ${FLOW_NOT_SET_ANYWHERE}")
    message = config_error(text, tmp_path)
    assert "call.model" in message and "FLOW_NOT_SET_ANYWHERE is not set" in message


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping" in config_error("- just\n- a list\n", tmp_path)
    assert "an empty file" in config_error("", tmp_path)


def test_unknown_input_format(tmp_path: Path) -> None:
    message = config_error(VALID.replace("rows.jsonl", "rows.xlsx"), tmp_path)
    assert "load.path" in message and "load.format" in message


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=30))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["store", "load", "call", "post", "path", "model",
                                     "messages", "role", "content", "params", "retry",
                                     "concurrency", "id", "regex", "python", "x"]),
                    inner, max_size=5)), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400))
def test_arbitrary_text_gives_only_config_errors(text: str, tmp_path: Path) -> None:
    try:
        parse_config(text, tmp_path / "pipeline.yaml")
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=YAML_VALUES)
def test_arbitrary_yaml_structures_give_only_config_errors(value: object, tmp_path: Path) -> None:
    import yaml as pyyaml
    try:
        parse_config(pyyaml.safe_dump(value), tmp_path / "pipeline.yaml")
    except ConfigError as e:
        assert str(e).startswith(str(tmp_path / "pipeline.yaml"))


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    assert "more than 100,000 values once YAML aliases" in config_error(bomb + VALID, tmp_path)


def test_dates_stay_text_and_values_json_cannot_carry_are_refused(tmp_path: Path) -> None:
    text = VALID.replace("post:", "  params: {metadata: {day: 2024-01-01}}\npost:")
    assert parse_config(text, tmp_path / "p.yaml").call.params == {
        "metadata": {"day": "2024-01-01"}}
    text = VALID.replace("post:", "  params: {stop: !!set {a, b}}\npost:")
    assert "params.stop is a set" in config_error(text, tmp_path)
    for value in (".inf", ".nan"):
        text = VALID.replace("post:", f"  timeout_s: {value}\npost:")
        assert "call.timeout_s: Input should be a finite number" in config_error(text, tmp_path)
        text = VALID.replace("post:", f"  params: {{temperature: {value}}}\npost:")
        assert "params.temperature is" in config_error(text, tmp_path)


def test_a_whole_value_variable_keeps_its_yaml_type(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMP", "0")
    monkeypatch.setenv("SEED", "42")
    monkeypatch.setenv("TAG", "v1")
    text = VALID.replace("post:", '  params:\n    temperature: ${TEMP}\n    seed: ${SEED:-1}\n'
                         '    user: "${SEED}"\n    metadata: {tag: "${TAG}"}\n    both: ${TAG}\n'
                         '    stop: ["x ${TEMP}"]\npost:')
    params = parse_config(text, tmp_path / "p.yaml").call.params
    assert params == {"temperature": 0, "seed": 42, "user": "42",
                      "metadata": {"tag": "v1"}, "both": "v1", "stop": ["x 0"]}
    # inside {...} a bare ${VAR} is not YAML: the message says to quote it
    text = VALID.replace("post:", "  params: {temperature: ${TEMP}}\npost:")
    assert 'quote a ${VAR} inside [...] or {...}' in config_error(text, tmp_path)


def test_an_encoding_rows_cannot_be_read_in_by_line_is_refused(tmp_path: Path) -> None:
    for encoding, message in (("utf-16", "'utf-16' is not supported"),
                              ("no-such", "unknown encoding 'no-such'")):
        text = VALID.replace("id: id}", f"id: id, encoding: {encoding}}}")
        assert f"load.encoding: {message}" in config_error(text, tmp_path)
    text = VALID.replace("id: id}", "id: id, encoding: latin-1}")
    assert parse_config(text, tmp_path / "p.yaml").load.encoding == "latin-1"


def test_headers_must_be_sendable_and_secret_ones_are_known(tmp_path: Path) -> None:
    text = VALID.replace("post:", '  headers: {"X-Ok": "a\\r"}\npost:')
    assert "call.headers: the value of 'X-Ok' has characters" in config_error(text, tmp_path)
    text = VALID.replace("post:", '  headers: {"Authorization": "Bearer tok-1234", '
                         '"X-Portkey-Api-Key": "pk-5678", "X-Team": "blue"}\npost:')
    call = parse_config(text, tmp_path / "p.yaml").call
    assert sorted(call.secrets()) == ["Bearer tok-1234", "pk-5678", "tok-1234"]
