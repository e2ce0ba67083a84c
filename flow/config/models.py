"""The pipeline file's keys, as typed and validated models."""

from __future__ import annotations

import codecs
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from flow.config.store_url import StoreURL, parse_store
from flow.schema import OutputSchema

RESERVED_PARAMS = ("model", "messages", "stream", "n")
BUILTIN_POST_STEPS = ("strip", "json", "lower")
KEYED_POST_STEPS = ("regex", "python")
STAGE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a name templates can use: `{{ answer.output }}`
# keys that belong to the run, not to one stage: every stage of a chain must agree on them
RUN_WIDE_KEYS = ("base_url", "endpoint_id", "api_key", "max_cost_usd", "drain_s",
                 "stop_after_failures")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoadConfig(_Strict):
    """Where the items come from."""

    path: Path
    id: str | None = None
    format: Literal["jsonl", "csv", "txt", "parquet"] | None = None
    encoding: str = "utf-8"
    max_row_bytes: int = Field(default=1_000_000, gt=0)
    max_row_lines: int = Field(default=100, gt=0)  # a CSV record's, quoted line breaks
    # CSV values arrive as text: a field named here is read as this type
    types: dict[str, Literal["str", "int", "float", "bool", "json"]] = Field(
        default_factory=dict)

    @field_validator("encoding")
    @classmethod
    def _line_based_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding '{encoding}'") from None
        if "\n".encode(encoding) != b"\n" or "a,{".encode(encoding) != b"a,{":
            raise ValueError(
                f"'{encoding}' is not supported: rows are read line by line as bytes, which "
                f"only works for UTF-8 and ASCII-based encodings; convert the file to UTF-8 "
                f"(iconv -f {encoding} -t utf-8)")
        return encoding

    @property
    def resolved_format(self) -> str:
        """The format given, or the one the file's suffix names."""
        if self.format:
            return self.format
        suffix = self.path.suffix.lower().lstrip(".")
        return {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "txt": "txt",
                "parquet": "parquet", "pq": "parquet"}.get(suffix, "")


class MessageConfig(_Strict):
    """One chat message; `content` is a Jinja2 template over the item's fields."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class RetryConfig(_Strict):
    """How long one item keeps trying before it is given up."""

    max_tries: int = Field(default=8, ge=1)
    max_time_s: float = Field(default=600, gt=0)
    first_wait_s: float = Field(default=0.5, ge=0)
    max_wait_s: float = Field(default=60, ge=0)


class PriceConfig(_Strict):
    """US dollars per million tokens."""

    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)
    cached_input_per_1m: float | None = Field(default=None, ge=0)


class BatchConfig(_Strict):
    """How the Batch API executor shards and waits (`executor: batch`)."""

    completion_window: Literal["24h"] = "24h"
    max_requests_per_batch: int = Field(default=50_000, ge=1, le=50_000)  # OpenAI's limit
    max_bytes_per_batch: int = Field(default=190_000_000, ge=1_000, le=200_000_000)
    # the account's enqueued-token limit for the model, when known: no batch is larger, and
    # batches running at once stay within it (each line at its prompt and `max_tokens`)
    max_enqueued_tokens: int | None = Field(default=None, gt=0)
    # expired or cancelled lines: into a new batch, or finished through the online path
    on_expired: Literal["requeue", "online"] = "requeue"
    first_poll_s: float = Field(default=5, ge=0)  # polling backs off from here...
    max_poll_s: float = Field(default=60, ge=0)  # ...to here
    # calls arriving in a trickle (a later stage) are cut into a batch after this lull
    gather_s: float = Field(default=5, ge=0)
    # a create whose outcome is unknown (the process died) is looked up again after this
    # long before it is made anew: a request still on its way is found by then
    create_grace_s: float = Field(default=10, ge=0)


class CallConfig(_Strict):
    """The request sent for each item, and how requests are paced and retried."""

    model: str = Field(min_length=1)
    # the messages of `chat` and `responses` (at least one); `embeddings` takes `input`
    messages: list[MessageConfig] = Field(default_factory=list)
    # `endpoint: embeddings`: the text embedded for each item, a Jinja2 template
    input: str | None = Field(default=None, min_length=1)
    # `endpoint: embeddings`: items packed into one request (OpenAI takes up to 2048)
    inputs_per_request: int = Field(default=100, ge=1, le=2048)
    params: dict[str, Any] = Field(default_factory=dict)
    concurrency: int = Field(default=32, ge=1, le=10_000)
    timeout_s: float = Field(default=60, gt=0)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    base_url: str | None = None
    # the name results are kept under: a server that moves (a new host or port) keeps them
    endpoint_id: str | None = Field(default=None, min_length=1)
    api_key: str | None = None
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    expected_output_tokens: int | None = Field(default=None, gt=0)
    price: PriceConfig | None = None
    max_cost_usd: float | None = Field(default=None, gt=0)
    drain_s: float = Field(default=30, ge=0)
    stop_after_failures: int = Field(default=20, ge=0)  # in a row, the same way; 0: never
    # a reply cut short at max_tokens: kept as done and flagged `truncated`, or failed
    on_truncated: Literal["keep", "fail"] = "keep"
    max_response_bytes: int = Field(default=10_000_000, gt=0)
    # sent with every request, never stored nor part of a request's key: gateway tokens
    headers: dict[str, str] = Field(default_factory=dict)
    # how calls are sent: now, `concurrency` at a time, or through the Batch API (half price)
    executor: Literal["online", "batch"] = "online"
    # the API a stage calls: chat completions, the Responses API (`input`, `text.format`),
    # or embeddings (a vector per item, many items a request)
    endpoint: Literal["chat", "responses", "embeddings"] = "chat"
    batch: BatchConfig = Field(default_factory=BatchConfig)
    # structured outputs: a JSON Schema inline, a .json file, or {python: module:Model};
    # `schema` in the file (a pydantic model has a method of that name)
    output_schema: dict[str, Any] | str | None = Field(default=None, alias="schema")
    schema_retries: int = Field(default=1, ge=0, le=10)  # re-asks quoting the mismatch

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"'{name}' is not a valid header name")
            if not value.isascii() or not value.isprintable() or value != value.strip():
                raise ValueError(f"the value of '{name}' has characters a header cannot "
                                 "carry (line breaks, spaces around it, or non-ASCII)")
        return headers

    def secrets(self) -> list[str]:
        """The values of headers that carry credentials (`Authorization`, `api-key`,
        `*-key`, `*-token`, `*-secret`), with and without their scheme (`Bearer `)."""
        found = []
        for name, value in self.headers.items():
            lowered = name.lower()
            if "auth" in lowered or lowered == "api-key" or lowered.endswith(
                    ("-key", "-token", "-secret")):
                found += [value, value.partition(" ")[2]]
        return [secret for secret in found if secret]

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name in RESERVED_PARAMS:
            if name in params:
                hint = "set call.model instead" if name == "model" else "flow sets it itself"
                raise ValueError(f"'{name}' cannot be a param ({hint})")
        _check_json(params, "params")
        return params


PostSteps = list[str | dict[str, str]]


class StageConfig(CallConfig):
    """One call stage of a chain: its call, when it applies, and its post steps.

    The one-stage form (`call:` and `post:`) is a chain of one stage named `call`.
    """

    name: str = Field(pattern=STAGE_NAME)
    # a Jinja2 expression over the row and earlier outputs; false: the stage is skipped
    when: str | None = Field(default=None, min_length=1)
    post: PostSteps = Field(default_factory=list)

    _checker: OutputSchema | None = PrivateAttr(default=None)

    @field_validator("post")
    @classmethod
    def _known_post_steps(cls, steps: PostSteps) -> PostSteps:
        return check_post_steps(steps)

    @property
    def post_steps(self) -> PostSteps:
        """The post steps its outputs are made with: `post`; an embeddings stage's output is
        its vector's dimensions, read as JSON (`{"dimensions": 1536}`)."""
        return ["json"] if self.endpoint == "embeddings" else self.post

    @property
    def checker(self) -> OutputSchema | None:
        """The loaded `schema`, once the pipeline file has been read."""
        return self._checker


class PipelineConfig(_Strict):
    """A whole pipeline file: one `call:` with its `post:`, or a chain of `stages:`."""

    # a SQLite file (relative to the pipeline file), or a PostgreSQL URL
    store: Path | StoreURL
    store_busy_timeout_s: float = Field(default=5, ge=0)
    # the longest one row's templates, or one reply's post steps, may take
    step_timeout_s: float = Field(default=10, gt=0)
    load: LoadConfig
    call: CallConfig | None = None
    post: PostSteps = Field(default_factory=list)
    # any call key, inherited by every stage (checked as part of each stage)
    defaults: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageConfig] | None = Field(default=None, min_length=1)

    _file: Path = PrivateAttr(default=Path("pipeline.yaml"))
    _chain: list[StageConfig] | None = PrivateAttr(default=None)

    @field_validator("store", mode="before")
    @classmethod
    def _store_kind(cls, value: object) -> object:
        return parse_store(value)

    @property
    def file(self) -> Path:
        """The pipeline file this config was read from."""
        return self._file

    @property
    def chain(self) -> list[StageConfig]:
        """The call stages in order; the one-stage form is one stage named `call`."""
        if self.stages is not None:
            return self.stages
        if self._chain is None:
            assert self.call is not None
            self._chain = [StageConfig(name="call", post=self.post, **dict(self.call))]
        return self._chain

    def limits_of(self, model: str) -> tuple[int | None, int | None]:
        """The rpm and tpm of the stages on `model`, which share one limit: the lowest each
        configures."""
        sharing = [stage for stage in self.chain if stage.model == model]
        return (min((s.rpm for s in sharing if s.rpm is not None), default=None),
                min((s.tpm for s in sharing if s.tpm is not None), default=None))

    @property
    def run_keys(self) -> StageConfig:
        """The stage whose run-wide keys (endpoint, key, budget, drain) the run reads: the
        first; every stage has the same values (checked when the file is read)."""
        return self.chain[0]

    @field_validator("post")
    @classmethod
    def _known_post_steps(cls, steps: PostSteps) -> PostSteps:
        return check_post_steps(steps)


def check_post_steps(steps: PostSteps) -> PostSteps:
    """The steps, or a `ValueError` naming the first one flow does not know."""
    for index, step in enumerate(steps):
        if isinstance(step, str):
            if step not in BUILTIN_POST_STEPS:
                raise ValueError(
                    f"step {index}: unknown step '{step}'; expected one of "
                    f"{', '.join(BUILTIN_POST_STEPS)}, or a mapping with one of "
                    f"{', '.join(KEYED_POST_STEPS)}"
                )
        elif len(step) != 1 or next(iter(step)) not in KEYED_POST_STEPS:
            raise ValueError(
                f"step {index}: expected a mapping with exactly one key out of "
                f"{', '.join(KEYED_POST_STEPS)}, got {sorted(step)}"
            )
    return steps


def _check_json(value: Any, where: str) -> None:
    """A `ValueError` naming the first value in `value` that JSON cannot carry."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}, which JSON cannot carry")
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise ValueError(f"{where} is a {type(value).__name__} (a YAML !!{type(value).__name__}?),"
                         " which JSON cannot carry; write it as a list or quote it as text")


