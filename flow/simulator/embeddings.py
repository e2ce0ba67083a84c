"""Embeddings (`POST /v1/embeddings`, and batch lines to it) as OpenAI answers them.

Each input gets a vector derived from its text alone (SHAKE-256 of the model and text, read
as int16 and scaled to about unit length), so the same text always gets the same vector,
and a shortened one (`dimensions`) is the start of the full one brought back to about unit
length, as OpenAI's are. Dimensions are the
model's (text-embedding-3-small 1,536, -3-large 3,072, ada-002 1,536; any other model
1,536); `dimensions` is honoured by the -3 models and refused by ada-002, as OpenAI does.
`encoding_format: base64` sends little-endian float32 bytes, `float` (the default) a list.
Limits are OpenAI's: 2,048 inputs, 8,192 tokens an input, 300,000 a request; an empty input
is refused. A `[sim:status=N]` in any input answers the whole request with that status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from array import array
from dataclasses import dataclass
from typing import Any

from flow.endpoints.embeddings import (
    DIMENSIONS,
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
)
from flow.simulator.completions import Reply, error_reply, read_marker, status_fault
from flow.tokens import count_text_tokens

DEFAULT_DIMENSIONS = 1536


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    """A request read: its model, inputs, dimensions and encoding."""

    model: str
    inputs: list[str]
    dimensions: int
    base64: bool


def read_embeddings_request(body: Any) -> EmbeddingsRequest | Reply:
    """The request, or the 400 OpenAI gives for it."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return _invalid("'model' is required", "model")
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str)
                                                             for t in inputs):
        return _invalid("'input' must be a string or a list of strings", "input")
    if len(inputs) > MAX_INPUTS:
        return _invalid(f"'input' has {len(inputs)} items; at most {MAX_INPUTS} are allowed",
                        "input")
    if any(not text for text in inputs):
        return _invalid("'$.input' is invalid: an input is empty", "input")
    model = body["model"]
    full = DIMENSIONS.get(model, DEFAULT_DIMENSIONS)
    asked = body.get("dimensions")
    if asked is not None:
        if model == "text-embedding-ada-002":
            return _invalid("This model does not support specifying dimensions.", "dimensions")
        if type(asked) is not int or not 1 <= asked <= full:
            return _invalid(f"'dimensions' must be an integer from 1 to {full}", "dimensions")
    form = body.get("encoding_format", "float")
    if form not in ("float", "base64"):
        return _invalid("'encoding_format' must be float or base64", "encoding_format")
    return EmbeddingsRequest(model, inputs, asked or full, form == "base64")


def count_tokens(request: EmbeddingsRequest) -> list[int] | Reply:
    """Each input's tokens, or the 400 for an input or request over the limits."""
    counts = count_text_tokens(request.inputs, request.model)
    for index, count in enumerate(counts):
        if count > MAX_INPUT_TOKENS:
            return _invalid(f"This model's maximum context length is {MAX_INPUT_TOKENS} "
                            f"tokens, however you requested {count} tokens in input "
                            f"{index}. Please reduce your prompt.", "input")
    if sum(counts) > MAX_REQUEST_TOKENS:
        return _invalid(f"Requested {sum(counts)} tokens, max {MAX_REQUEST_TOKENS} tokens "
                        "per request", "input")
    return counts


def embed(request: EmbeddingsRequest, arrivals: int = 1) -> Reply:
    """The whole answer to a request (a batch line's): a `[sim:status=N]` marker's error, a
    400 over the limits, or the vectors with their tokens."""
    marker = read_marker("\n".join(request.inputs), arrivals)
    if marker is not None and marker.startswith("status="):
        return status_fault(marker.removeprefix("status="), "", True)
    counts = count_tokens(request)
    if isinstance(counts, Reply):
        return counts
    return Reply(200, embeddings_body(request, sum(counts)), tokens=sum(counts))


def embeddings_body(request: EmbeddingsRequest, tokens: int) -> str:
    """The 200 body: one vector per input, by index, and the usage."""
    data = [{"object": "embedding", "index": index,
             "embedding": _encoded(vector_of(request.model, text, request.dimensions),
                                   request.base64)}
            for index, text in enumerate(request.inputs)]
    return json.dumps({"object": "list", "data": data, "model": request.model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def vector_of(model: str, text: str, dimensions: int) -> array[float]:
    """The vector of `text`: deterministic, about unit length."""
    seed = hashlib.shake_256(f"{model}\x00{text}".encode("utf-8", "surrogatepass"))
    values = array("h", seed.digest(2 * dimensions))
    scale = 1.0 / math.sqrt(dimensions * 32768.0 ** 2 / 3)
    return array("f", map(scale.__mul__, values))


def _encoded(vector: array[float], as_base64: bool) -> str | list[float]:
    if as_base64:
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return [float(f"{value:.8g}") for value in vector]


def _invalid(message: str, param: str) -> Reply:
    return error_reply(400, "invalid_request_error", None, message, param)
