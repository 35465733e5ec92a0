"""The table layout, as pure functions: row keys, entity <-> model, and lossless text split.

One partition per assistant id. ``state`` and ``msg-XXXX`` rows use the extension's property
names so that the extension can read chats the worker writes, and the other way round. Rows of
the worker's own use other prefixes, which the extension ignores.
"""

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

STATE_ROW = "state"
MESSAGE_PREFIX = "msg-"
REQUEST_PREFIX = "req-"
# The first key after every "msg-XXXX" key ('.' sorts right after '-').
MESSAGE_PREFIX_END = "msg."

# A string property holds at most 64 KiB = 32,768 UTF-16 code units. A code point takes at
# most two units, so 16,384 code points always fit whatever the text.
MAX_PROPERTY_CHARS = 16_384
# An entity holds at most 1 MiB; leave room for the other properties.
MAX_TEXT_CHARS_PER_ROW = MAX_PROPERTY_CHARS * 14

Role = Literal["System", "User", "Assistant", "Tool"]


def message_row_key(index: int) -> str:
    """``msg-0001``: 1-based, four uppercase hex digits (the extension's format)."""
    return f"{MESSAGE_PREFIX}{index:04X}"


def request_row_key(request_id: str) -> str:
    """The row recording that a request was applied (ids may hold characters keys can't)."""
    digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:40]
    return f"{REQUEST_PREFIX}{digest}"


def split_text(name: str, text: str) -> dict[str, Any]:
    """Store ``text`` under ``name``, spilling into ``{name}Part2``... when it is too long.

    The first chunk stays in ``name`` so that readers that know only the extension's layout
    still see the start of the text; ``{name}Parts`` says how many chunks there are.
    """
    if len(text) > MAX_TEXT_CHARS_PER_ROW:
        raise ValueError(
            f"{name} is {len(text)} characters; at most {MAX_TEXT_CHARS_PER_ROW} fit in one row"
        )
    chunks = [text[i : i + MAX_PROPERTY_CHARS] for i in range(0, len(text), MAX_PROPERTY_CHARS)]
    if len(chunks) <= 1:
        return {name: text}
    properties: dict[str, Any] = {name: chunks[0], f"{name}Parts": len(chunks)}
    for number, chunk in enumerate(chunks[1:], start=2):
        properties[f"{name}Part{number}"] = chunk
    return properties


def join_text(entity: dict[str, Any], name: str) -> str:
    """The whole text that ``split_text`` stored under ``name``."""
    first = entity.get(name) or ""
    parts = int(entity.get(f"{name}Parts") or 1)
    return str(first) + "".join(str(entity.get(f"{name}Part{n}", "")) for n in range(2, parts + 1))


def utc(value: Any) -> datetime | None:
    """A table datetime as an aware UTC datetime (the SDK returns naive or aware)."""
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class ChatState:
    """The ``state`` row: the extension's fields plus the assistant's defaults."""

    chat_id: str
    exists: bool
    created_at: datetime
    last_updated_at: datetime
    total_messages: int
    total_tokens: int
    defaults: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None


def state_entity(state: ChatState) -> dict[str, Any]:
    return {
        "PartitionKey": state.chat_id,
        "RowKey": STATE_ROW,
        "Exists": state.exists,
        "CreatedAt": state.created_at,
        "LastUpdatedAt": state.last_updated_at,
        "TotalMessages": state.total_messages,
        "TotalTokens": state.total_tokens,
        "Defaults": json.dumps(state.defaults, separators=(",", ":"), sort_keys=True),
    }


def state_from_entity(entity: dict[str, Any], etag: str | None) -> ChatState:
    defaults_text = entity.get("Defaults") or "{}"
    try:
        defaults = json.loads(defaults_text)
    except json.JSONDecodeError:
        defaults = {}
    epoch = datetime(1, 1, 1, tzinfo=UTC)
    return ChatState(
        chat_id=str(entity["PartitionKey"]),
        exists=bool(entity.get("Exists", False)),
        created_at=utc(entity.get("CreatedAt")) or epoch,
        last_updated_at=utc(entity.get("LastUpdatedAt")) or epoch,
        total_messages=int(entity.get("TotalMessages") or 0),
        total_tokens=int(entity.get("TotalTokens") or 0),
        defaults=defaults if isinstance(defaults, dict) else {},
        etag=etag,
    )


@dataclass(frozen=True)
class ChatMessage:
    """One ``msg-XXXX`` row."""

    index: int
    role: Role
    content: str
    created_at: datetime
    name: str | None = None
    tool_calls: str = ""
    run_id: str | None = None


def message_entity(chat_id: str, message: ChatMessage) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": chat_id,
        "RowKey": message_row_key(message.index),
        "Role": message.role,
        "CreatedAt": message.created_at,
        "ToolCalls": message.tool_calls,
        **split_text("Content", message.content),
    }
    if message.name is not None:
        entity["Name"] = message.name
    if message.run_id is not None:
        entity["RunId"] = message.run_id
    return entity


def message_from_entity(entity: dict[str, Any]) -> ChatMessage:
    role = str(entity.get("Role") or "User")
    return ChatMessage(
        index=int(str(entity["RowKey"])[len(MESSAGE_PREFIX) :], 16),
        role=role if role in ("System", "User", "Assistant", "Tool") else "User",  # type: ignore[arg-type]
        content=join_text(entity, "Content"),
        created_at=utc(entity.get("CreatedAt")) or datetime(1, 1, 1, tzinfo=UTC),
        name=entity.get("Name") or None,
        tool_calls=str(entity.get("ToolCalls") or ""),
        run_id=entity.get("RunId") or None,
    )


@dataclass(frozen=True)
class AppliedRequest:
    """The record that a request took effect, written with that effect."""

    request_id: str
    message_type: str
    message_id: str
    applied_at: datetime


def applied_request_entity(chat_id: str, applied: AppliedRequest) -> dict[str, Any]:
    return {
        "PartitionKey": chat_id,
        "RowKey": request_row_key(applied.request_id),
        "RequestId": applied.request_id,
        "Type": applied.message_type,
        "MessageId": applied.message_id,
        "AppliedAt": applied.applied_at,
    }
