"""Keep secrets out of logs, errors, reply events and dead letters.

Two nets: the exact values of every configured secret, and patterns for secrets that arrive
from elsewhere (a connection string in an SDK error, a SAS signature in a URL, a bearer token).
"""

import re
from collections.abc import Iterable

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
)


class Redactor:
    """Replaces known secret values and secret-looking patterns with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda match: match.group(1) + MASK, text)
        return text
