"""Embeddings (`/v1/embeddings`) on the wire: many inputs in one request, one vector each.

Pure functions, as `chat` is for chat completions. An item's own request is
`{"model", "input": text, "dimensions"?}`: its content key names what the item needs, so
identical texts share one vector and a re-run finds what it has. Items are packed into one
request (`packed_request`) with `encoding_format: base64` (a quarter of the bytes of decimal
floats, and no float parsing); the reply is read back into one little-endian float32 vector
per input, by `index` (`parse_packed`). Each item's share of the request is stored as a
reply of its own (`item_body`): a small JSON body naming the packed request it came from,
its tokens, and its vector beside it as bytes.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from flow.errors import ConfigError, ResponseError, RetryableError
from flow.keys import canonical_json, key_of_json
from flow.records import Reply, Usage

PATH = "/embeddings"
OBJECT = "embedding"  # the `object` of one item's stored share of a packed reply
# OpenAI's limits for one request: inputs, tokens over all inputs, and tokens of one input
MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
MAX_INPUT_TOKENS = 8192
PARAMS = frozenset({"dimensions", "user", "extra_body", "extra_query"})
# vectors per model, where the model fixes it (`dimensions` shortens the -3 models')
DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
              "text-embedding-ada-002": 1536}


def check_params(params: Mapping[str, Any]) -> None:
    """A `ConfigError` for a param the embeddings endpoint does not take."""
    for name in params:
        if name == "encoding_format":
            raise ConfigError("call.params.encoding_format: flow asks for base64 itself and "
                              "stores float32 vectors; remove it")
        if name not in PARAMS:
            raise ConfigError(f"call.params.{name}: not an embeddings parameter (expected "
                              f"{', '.join(sorted(PARAMS))}); a provider's own parameters "
                              "go under call.params.extra_body")


def item_request(model: str, text: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """One item's request: what its content key is made of."""
    return {"model": model, "input": text, **params}


def packed_request(requests: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], str]:
    """The one request that asks for every item of `requests` (same model and params), in
    order, and its canonical JSON (its key names the pack)."""
    first = requests[0]
    packed = {**first, "input": [r["input"] for r in requests], "encoding_format": "base64"}
    return packed, canonical_json(packed)


def pack_key(request_json: str) -> str:
    """The content key of a packed request."""
    return key_of_json(request_json)


def estimate_tokens(inputs: Sequence[str]) -> int:
    """A packed request's tokens before it is sent, about 4 characters a token."""
    return sum(len(text) for text in inputs) // 4 + len(inputs)


def token_bound(text: str) -> int:
    """An upper bound of a text's tokens without the tokenizer: a token is at least a byte."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def parse_packed(body: str, count: int) -> tuple[list[bytes], Usage | None]:
    """The `count` vectors of a packed reply, in input order, as float32 bytes, and the
    request's usage; a `RetryableError` for a body that is not that."""
    try:
        value = json.loads(body)
        data = value["data"]
        if not isinstance(data, list) or len(data) != count:
            raise ValueError
        vectors: list[bytes | None] = [None] * count
        for entry in data:
            vectors[entry["index"]] = _vector_bytes(entry["embedding"])
    except (ValueError, KeyError, IndexError, TypeError, RecursionError, struct.error):
        raise RetryableError(f"malformed embeddings body: {body[:120]!r}",
                             "ResponseError") from None
    if any(v is None for v in vectors) or len({len(v or b"") for v in vectors}) != 1:
        raise RetryableError("embeddings body lacks a vector for some input, or mixes "
                             "dimensions", "ResponseError")
    return [v for v in vectors if v is not None], read_usage(value)


def _vector_bytes(embedding: Any) -> bytes:
    """A vector as little-endian float32 bytes, from base64 (as asked) or a list of floats
    (a server that ignores `encoding_format`)."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        if not raw or len(raw) % 4:
            raise ValueError
        return raw if sys.byteorder == "little" else _swap(raw)
    if isinstance(embedding, list) and embedding:
        return struct.pack(f"<{len(embedding)}f", *embedding)
    raise ValueError


def _swap(raw: bytes) -> bytes:
    count = len(raw) // 4
    return struct.pack(f"<{count}f", *struct.unpack(f">{count}f", raw))


def split_tokens(total: int, weights: Sequence[int]) -> list[int]:
    """`total` tokens shared in proportion to `weights` (each input's length), in whole
    tokens that add up to `total` exactly (largest remainders take the rest)."""
    whole = sum(weights) or len(weights)
    exact = [total * (w if sum(weights) else 1) / whole for w in weights]
    shares = [int(e) for e in exact]
    rest = total - sum(shares)
    for index in sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])[:rest]:
        shares[index] += 1
    return shares


def item_body(model: str, dimensions: int, tokens: int, key: str, index: int,
              inputs: int) -> str:
    """One item's stored share of a packed reply: its tokens and where it came from (the
    vector itself is stored beside it as bytes)."""
    return canonical_json({"object": OBJECT, "model": model, "dimensions": dimensions,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                           "packed": {"request_key": key, "index": index, "inputs": inputs}})


def is_item_body(value: Any) -> bool:
    """Whether a parsed body is one item's share of a packed embeddings reply."""
    return isinstance(value, dict) and value.get("object") == OBJECT


def parse_reply(body: str) -> tuple[Reply, dict[str, Any]]:
    """An item's stored share read again: the text its output is made from (the vector's
    dimensions, as JSON), and the body as a value. A packed reply as it arrives is checked
    for its list of vectors only."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise RetryableError(f"malformed embeddings body: {body[:120]!r}",
                             "ResponseError") from None
    if isinstance(value, dict) and value.get("object") == "list" \
            and isinstance(value.get("data"), list):
        return Reply("", "stop"), value  # a packed reply: `parse_packed` reads its vectors
    if not is_item_body(value) or not isinstance(value.get("dimensions"), int):
        raise ResponseError(f"not an embedding: {body[:120]!r}")
    return Reply(output_text(value["dimensions"]), "stop"), value


def output_text(dimensions: int) -> str:
    """What an embedding item's output is (the vector is stored apart, as bytes)."""
    return json.dumps({"dimensions": dimensions})


def read_usage(value: Any) -> Usage | None:
    """The prompt tokens a body reports (embeddings have no completion tokens)."""
    usage = value.get("usage") if isinstance(value, dict) else None
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("prompt_tokens")
    return Usage(tokens if type(tokens) is int and tokens >= 0 else 0, 0, 0)


def floats(vector: bytes) -> tuple[float, ...]:
    """A stored vector as floats."""
    return struct.unpack(f"<{len(vector) // 4}f", vector)
