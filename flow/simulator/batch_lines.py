"""A batch's input and results: its create's parameters, its input file's lines, its results.

An input file fails validation, as OpenAI's does, for a line that is not a JSON object, lacks
`custom_id`, `method`, `url` or `body`, repeats a `custom_id`, has a `method` other than POST
or a `url` other than the batch's endpoint, or names a model other than the first line's; for
an empty file; and for more than `MAX_REQUESTS` lines. Every such line is listed in the
batch's `errors` with its number (from 1) and what is wrong with it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from flow.simulator.completions import ChatRequest, Reply, read_request
from flow.simulator.embeddings import EmbeddingsRequest, read_embeddings_request
from flow.simulator.responses import as_chat_body
from flow.tokens import count_prompt_tokens, count_text_tokens

ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
RESPONSES = "/v1/responses"  # its lines are read as the chat requests they amount to
EMBEDDINGS = "/v1/embeddings"  # its lines are embeddings requests (an input or a list)
MAX_METADATA = 16
MAX_REQUESTS = 50_000
MAX_ERRORS = 100  # validation errors listed per batch
REQUIRED = ("custom_id", "method", "url", "body")
UNDONE_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


def invalid_params(params: dict[str, Any]) -> tuple[str, str] | None:
    """What is wrong with a create's parameters, as a message and the parameter, or None."""
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(params.get(name), str):
            return f"Missing required parameter: '{name}'.", name
    if params["endpoint"] not in ENDPOINTS:
        return (f"Invalid value for 'endpoint': {params['endpoint']!r}; the simulator serves "
                f"{', '.join(ENDPOINTS)}.", "endpoint")
    if params["completion_window"] != "24h":
        return "Invalid value for 'completion_window': only '24h' is supported.", \
            "completion_window"
    metadata = params.get("metadata")
    if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= MAX_METADATA
            and all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64
                    and len(v) <= 512 for k, v in metadata.items())):
        return (f"Invalid 'metadata': at most {MAX_METADATA} string keys (64 characters) "
                "and string values (512 characters).", "metadata")
    return None


@dataclass(frozen=True)
class Line:
    """One request of a batch: where it is in the file, its id, and its body."""

    number: int
    custom_id: str
    body: Any
    request: ChatRequest | None  # None: not a chat completion request, answered 400
    # a line of an embeddings batch: its request, or the 400 it gets
    embeddings: EmbeddingsRequest | Reply | None = None

    @property
    def model(self) -> str | None:
        """The model it asks for, when it is a request the simulator reads."""
        if isinstance(self.embeddings, EmbeddingsRequest):
            return self.embeddings.model
        return self.request.model if self.request is not None else None

    def enqueued_tokens(self) -> int:
        """What OpenAI's enqueued-token limit counts for it: prompt tokens and `max_tokens`."""
        if isinstance(self.embeddings, EmbeddingsRequest):
            return sum(count_text_tokens(self.embeddings.inputs, self.embeddings.model))
        if self.request is None:
            return 0
        body = self.request.body
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else 0
        return count_prompt_tokens(self.request.messages, self.request.model) + cap


def read_lines(data: bytes, endpoint: str) -> tuple[list[Line], list[dict[str, Any]]]:
    """The requests of an input file, and the validation errors it has (none: it is valid)."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    # split on newlines only: a JSON string may hold U+2028, which `splitlines` breaks at
    for number, text in enumerate(data.decode("utf-8", "replace").split("\n"), start=1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except ValueError:
            item = None
        problem = _problem(item, endpoint, seen)
        if problem is None:
            if endpoint == EMBEDDINGS:
                line = Line(number, item["custom_id"], item["body"], None,
                            read_embeddings_request(item["body"]))
            else:
                body = as_chat_body(item["body"]) if endpoint == RESPONSES else item["body"]
                line = Line(number, item["custom_id"], item["body"], read_request(body))
            seen.add(line.custom_id)
            model = model or line.model
            if line.model is not None and line.model != model:
                problem = ("mismatched_model", f"The model {line.model!r} differs from "
                           f"the batch's model {model!r}: a batch holds requests to one model.",
                           "body.model")
            lines.append(line)
        if problem is not None:
            code, message, param = problem
            errors.append({"code": code, "message": message, "param": param, "line": number})
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The batch input file is empty.",
                       "param": None, "line": None})
    if len(lines) > MAX_REQUESTS:
        errors.append({"code": "exceeded_max_requests", "message": f"The batch input file "
                       f"has {len(lines)} requests; the limit is {MAX_REQUESTS}.",
                       "param": None, "line": None})
    return lines, errors[:MAX_ERRORS]


def _problem(item: Any, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    """What is wrong with one parsed line: a code, a message and the parameter, or None."""
    if not isinstance(item, dict):
        return "invalid_json_line", "This line is not parseable as a JSON object.", None
    for name in REQUIRED:
        if name not in item:
            return "missing_required_parameter", f"Missing required parameter: '{name}'.", name
    if not isinstance(item["custom_id"], str):
        return "invalid_type", "Invalid type for 'custom_id': expected a string.", "custom_id"
    if item["method"] != "POST":
        return "invalid_value", "Invalid value for 'method': only POST is supported.", "method"
    if item["url"] != endpoint:
        return ("invalid_url", f"The URL provided for this request ({item['url']!r}) does not "
                f"match the batch's endpoint {endpoint}.", "url")
    if not isinstance(item["body"], dict):
        return "invalid_type", "Invalid type for 'body': expected an object.", "body"
    if item["custom_id"] in seen:
        return ("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                "another request. The custom_id parameter must be unique for each request in "
                "a batch.", "custom_id")
    return None


def result_line(line: Line, reply: Reply) -> dict[str, Any]:
    """A line of the output file (status 200) or of the error file (any other status)."""
    return {"id": "batch_req_" + secrets.token_hex(16), "custom_id": line.custom_id,
            "response": {"status_code": reply.status,
                         "request_id": "req_" + secrets.token_hex(16),
                         "body": json.loads(reply.text)},
            "error": None}


def undone_line(line: Line, code: str) -> dict[str, Any]:
    """A line of the error file for a request never run: `batch_expired` or `batch_cancelled`."""
    return {"id": "batch_req_" + secrets.token_hex(16), "custom_id": line.custom_id,
            "response": None, "error": {"code": code, "message": UNDONE_MESSAGES[code]}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    """Lines as a JSONL file."""
    return "".join(json.dumps(line) + "\n" for line in lines).encode()
