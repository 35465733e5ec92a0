"""Who may read chats over HTTP: a request that presents one of the ``WORKER_QUERY_KEYS``.

A key comes as ``Authorization: Bearer <key>`` or as ``x-functions-key: <key>`` (the Azure
Functions convention, so callers of the extension's query keep their header). Pure: no I/O.

The comparison takes the same time whichever key matches, and however much of a guess is
right: every presented value is compared with every key (no early exit on the first match),
and both sides are SHA-256 digests first, so ``hmac.compare_digest`` sees equal lengths and
the time does not even tell a key's length.
"""

import hashlib
import hmac
from collections.abc import Iterable, Mapping

# The WWW-Authenticate challenge of a 401 (RFC 6750 names the scheme).
CHALLENGE = "Bearer"
FUNCTIONS_KEY_HEADER = "x-functions-key"


def presented_keys(headers: Mapping[str, str]) -> list[str]:
    """The keys a request presents (``headers`` case-insensitive, as aiohttp's are)."""
    found = []
    authorization = headers.get("Authorization", "")
    scheme, _, credentials = authorization.strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110 §11.1); the key is not.
    if scheme.lower() == "bearer" and credentials.strip():
        found.append(credentials.strip())
    functions_key = headers.get(FUNCTIONS_KEY_HEADER, "").strip()
    if functions_key:
        found.append(functions_key)
    return found


def _digest(text: str) -> bytes:
    # surrogateescape: a header's undecodable bytes still hash (to something no key has).
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class QueryKeys:
    """The keys that open the query; several at once during a rotation."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"QueryKeys({len(self._digests)} keys)"

    def accepts(self, presented: Iterable[str]) -> bool:
        """Whether any presented value is one of the keys, in constant time per pair."""
        matched = False
        for value in presented:
            digest = _digest(value)
            for key in self._digests:
                matched |= hmac.compare_digest(digest, key)
        return matched
