"""What a message says it is, read best-effort from any body (pure): its type, chat id and
``requestId``, as ``poison list`` shows them.

For the log lines of messages that were never decoded (an invalid body) or never run (the
crash guard), so that searching the log for a chat or a request finds its dead letters too,
and for the crash guard's choice of the messages that still reach their handler. Nothing here
fails: a body that says nothing yields nothing, and what it says is capped.
"""

from dataclasses import dataclass
from typing import Any

from schemas import InvalidMessage, decode_body
from schemas.decode import infer_type, unwrap_dead_letter

# The type reported for a body that is not a JSON object (as ``poison list --type invalid``).
INVALID_TYPE = "invalid"
# Characters kept of each value read from an unchecked body (a log line must stay a line).
MAX_VALUE_CHARS = 200


@dataclass(frozen=True)
class Identity:
    """A body's type, chat id and request id, each None when it does not say."""

    type: str | None = None
    chat_id: str | None = None
    request_id: str | None = None

    def log_fields(self) -> dict[str, str]:
        """The loop's log field names, for the values the body gave."""
        fields = {"type": self.type, "chat_id": self.chat_id, "request_id": self.request_id}
        return {name: value for name, value in fields.items() if value is not None}


def message_type_of(message: Any) -> str:
    """The type of a decoded body, inferred for the extension's untyped payloads; ``invalid``
    when it is not a JSON object."""
    if not isinstance(message, dict):
        return INVALID_TYPE
    try:
        return infer_type(message)
    except InvalidMessage:
        declared = message.get("type")
        return declared if isinstance(declared, str) else INVALID_TYPE


def identity_of(body: str) -> Identity:
    """What ``body`` (plain or Base64 JSON, perhaps a replayed dead letter) says it is."""
    try:
        decoded = unwrap_dead_letter(decode_body(body, strict_text=False))
    except (InvalidMessage, RecursionError):
        return Identity(type=INVALID_TYPE)
    return Identity(
        type=_capped(message_type_of(decoded)),
        chat_id=_capped(decoded.get("id")),
        request_id=_capped(decoded.get("requestId")),
    )


def _capped(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "…"
