"""Keep secrets out of logs, errors, reply events and dead letters.

Two nets: the exact values of every configured secret, and patterns for secrets that arrive
from elsewhere (a connection string in an SDK error, a SAS signature in a URL, a bearer token).
"""

import re
from collections.abc import Callable, Iterable
from typing import Any

MASK = "***"

_PATTERNS = (
    # AccountKey=...; SharedAccessSignature=...; in connection strings
    re.compile(
        r"(?i)\b((?:AccountKey|SharedAccessSignature|SharedAccessKey|Password)=)([^;\s\"']+)"
    ),
    # sig=... in SAS query strings
    re.compile(r"(?i)([?&]sig=)([^&\s\"']+)"),
    # Authorization: Bearer ... / api-key: ...
    re.compile(r"(?i)\b(Bearer\s+)([A-Za-z0-9._~+/=-]{8,})"),
    re.compile(r"(?i)\b(api[-_]key[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]+)"),
    # OpenAI-style keys
    re.compile(r"()\b(sk-[A-Za-z0-9_-]{8,})"),
    # Webhook signing secrets (Standard Webhooks)
    re.compile(r"()\b(whsec_[A-Za-z0-9+/=]{8,})"),
)


class Redactor:
    """Replaces known secret values and secret-looking patterns with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = self.mask_known(text)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda match: match.group(1) + MASK, text)
        return text

    def mask_known(self, text: str) -> str:
        """Mask only the configured secret values, never a mere pattern.

        For content that is kept to be replayed (a dead letter's original message): text that
        merely looks like a key ("api_key: ...") in a user message must survive a replay, but
        the worker's own keys never belong in a message.
        """
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def mask_values(value: Any, mask: Callable[[str], str]) -> Any:
    """``value`` with ``mask`` applied to every string in it (JSON-like data, keys included)."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {mask_values(key, mask): mask_values(item, mask) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_values(item, mask) for item in value]
    return value
