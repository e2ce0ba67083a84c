"""Content keys: tagged hashes of canonical JSON, so the algorithm can change later.

A request's key names it in the store: the same model, messages and params give the same
key, which is how a re-run knows what it has already paid for.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

HASH_PREFIX = "sha256:"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: one text for one value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_key(value: Any) -> str:
    """A tagged SHA-256 of the canonical JSON of `value`."""
    return key_of_json(canonical_json(value))


def key_of_json(text: str) -> str:
    """The content key of a value already in canonical JSON."""
    return HASH_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
