"""Keeping the API key out of everything flow stores or prints.

The key is taken out of whole texts and values before anything is cut to length, so no
part of it survives a cut.
"""

from __future__ import annotations

import json
from typing import Any

MASK = "[REDACTED]"
MIN_SECRET_CHARS = 4  # shorter "keys" (a test's "x") would mask ordinary text


class Redactor:
    """Replaces one secret wherever it appears."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret if secret and len(secret) >= MIN_SECRET_CHARS else None

    def text(self, text: str) -> str:
        """`text` with the secret masked."""
        return text.replace(self._secret, MASK) if self._secret else text

    def value(self, value: Any) -> Any:
        """A JSON value (an error body) with the secret masked in every string in it."""
        if self._secret is None or value is None:
            return value
        try:
            return json.loads(self.text(json.dumps(value)))
        except (TypeError, ValueError):
            return self.text(str(value))
