"""Keeping the API key and secret headers out of everything flow stores or prints.

Secrets are taken out of whole texts and values before anything is cut to length, so no
part of one survives a cut.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MASK = "[REDACTED]"
MIN_SECRET_CHARS = 4  # shorter "keys" (a test's "x") would mask ordinary text


class Redactor:
    """Replaces each of some secrets wherever it appears."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        # the longest first, so a secret that holds another is masked whole
        self._secrets = sorted({secret for secret in secrets
                                if secret and len(secret) >= MIN_SECRET_CHARS}, key=len,
                               reverse=True)

    def text(self, text: str) -> str:
        """`text` with every secret masked."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def value(self, value: Any) -> Any:
        """A JSON value (an error body) with every secret masked in every string in it."""
        if not self._secrets or value is None:
            return value
        try:
            return json.loads(self.text(json.dumps(value)))
        except (TypeError, ValueError):
            return self.text(str(value))
