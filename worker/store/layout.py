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

from worker.runs.model import PendingCall, Run, Usage

STATE_ROW = "state"
MESSAGE_PREFIX = "msg-"
REQUEST_PREFIX = "req-"
RUN_PREFIX = "run-"
# The first key after every "run-..." key.
RUN_PREFIX_END = "run."
# The first key after every "msg-XXXX" key ('.' sorts right after '-').
MESSAGE_PREFIX_END = "msg."
# Results of a run's local tool calls, stored as each call finishes (``tool-<runId>-<hash>``).
TOOL_RESULT_PREFIX = "tool-"

# A string property holds at most 64 KiB, i.e. 32,768 UTF-16 code units; an entity at most
# 1 MiB. Text is split by UTF-16 units so that characters outside the BMP (two units) count
# right, with room left for the row's other properties.
MAX_PROPERTY_UNITS = 32_000
MAX_TEXT_UNITS_PER_ROW = 450_000

Role = Literal["System", "User", "Assistant", "Tool"]


def message_row_key(index: int) -> str:
    """``msg-0001``: 1-based, four uppercase hex digits (the extension's format)."""
    return f"{MESSAGE_PREFIX}{index:04X}"


def request_row_key(request_id: str) -> str:
    """The row recording that a request was applied (ids may hold characters keys can't)."""
    digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:40]
    return f"{REQUEST_PREFIX}{digest}"


def utf16_units(text: str) -> int:
    """The length of ``text`` as Table Storage counts it."""
    return (
        len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF) if not text.isascii() else len(text)
    )


def _chunks(text: str, max_units: int) -> list[str]:
    if text.isascii():
        return [text[i : i + max_units] for i in range(0, len(text), max_units)] or [""]
    chunks: list[str] = []
    start = units = 0
    for index, ch in enumerate(text):
        width = 2 if ord(ch) > 0xFFFF else 1
        if units + width > max_units:
            chunks.append(text[start:index])
            start, units = index, 0
        units += width
    chunks.append(text[start:])
    return chunks


def split_text(name: str, text: str) -> dict[str, Any]:
    """Store ``text`` under ``name``, spilling into ``{name}Part2``... when it is too long.

    The first chunk stays in ``name`` so that readers that know only the extension's layout
    still see the start of the text; ``{name}Parts`` says how many chunks there are.
    """
    if utf16_units(text) > MAX_TEXT_UNITS_PER_ROW:
        raise ValueError(
            f"{name} is {len(text)} characters; at most {MAX_TEXT_UNITS_PER_ROW} UTF-16 units "
            "fit in one row"
        )
    chunks = _chunks(text, MAX_PROPERTY_UNITS)
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
    """The ``state`` row: the extension's fields, the assistant's defaults, and the run queue.

    ``active_run_id`` is the one run allowed to change the chat's messages; ``next_run_seq``
    numbers runs in arrival order; ``remote`` keeps backend ids that live as long as the chat
    (the Assistants API's assistant and thread).
    """

    chat_id: str
    exists: bool
    created_at: datetime
    last_updated_at: datetime
    total_messages: int
    total_tokens: int
    defaults: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None
    active_run_id: str | None = None
    next_run_seq: int = 1
    remote: dict[str, Any] = field(default_factory=dict)


def state_entity(state: ChatState) -> dict[str, Any]:
    return {
        "PartitionKey": state.chat_id,
        "RowKey": STATE_ROW,
        "Exists": state.exists,
        "CreatedAt": state.created_at,
        "LastUpdatedAt": state.last_updated_at,
        "TotalMessages": state.total_messages,
        "TotalTokens": state.total_tokens,
        "Defaults": _json(state.defaults),
        "ActiveRunId": state.active_run_id or "",
        "NextRunSeq": state.next_run_seq,
        "Remote": _json(state.remote),
    }


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _json_dict(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) and text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def state_from_entity(entity: dict[str, Any], etag: str | None) -> ChatState:
    """A ``state`` row, the extension's (without the worker's properties) included."""
    epoch = datetime(1, 1, 1, tzinfo=UTC)
    return ChatState(
        chat_id=str(entity["PartitionKey"]),
        exists=bool(entity.get("Exists", False)),
        created_at=utc(entity.get("CreatedAt")) or epoch,
        last_updated_at=utc(entity.get("LastUpdatedAt")) or epoch,
        total_messages=int(entity.get("TotalMessages") or 0),
        total_tokens=int(entity.get("TotalTokens") or 0),
        defaults=_json_dict(entity.get("Defaults")),
        etag=etag,
        active_run_id=entity.get("ActiveRunId") or None,
        next_run_seq=int(entity.get("NextRunSeq") or 1),
        remote=_json_dict(entity.get("Remote")),
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


_ROLES: dict[str, Role] = {
    "system": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
    # Older writers used these names for what is now a system / tool message.
    "developer": "System",
    "function": "Tool",
}


def parse_role(value: Any) -> Role:
    """A stored role, whatever its case (older extension versions wrote lowercase roles)."""
    role = _ROLES.get(str(value or "").strip().lower())
    if role is None:
        raise ValueError(f"unknown message role {value!r}")
    return role


def message_from_entity(entity: dict[str, Any]) -> ChatMessage:
    """A ``msg-`` row (written by the extension or the worker) as a message."""
    return ChatMessage(
        index=int(str(entity["RowKey"])[len(MESSAGE_PREFIX) :], 16),
        role=parse_role(entity.get("Role")),
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
    run_id: str | None = None


def applied_request_entity(chat_id: str, applied: AppliedRequest) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": chat_id,
        "RowKey": request_row_key(applied.request_id),
        "RequestId": applied.request_id,
        "Type": applied.message_type,
        "MessageId": applied.message_id,
        "AppliedAt": applied.applied_at,
    }
    if applied.run_id is not None:
        entity["RunId"] = applied.run_id
    return entity


def run_row_key(run_id: str) -> str:
    return f"{RUN_PREFIX}{run_id}"


def run_entity(chat_id: str, run: Run) -> dict[str, Any]:
    """A run row; the user message is split like message content, so no size bricks it."""
    entity: dict[str, Any] = {
        "PartitionKey": chat_id,
        "RowKey": run_row_key(run.run_id),
        "RunId": run.run_id,
        "Seq": run.seq,
        "Status": run.status,
        "RequestId": run.request_id,
        "Api": run.api,
        "Model": run.model,
        "Params": _json(run.params),
        "ReplyTo": run.reply_to or "",
        "CreatedAt": run.created_at,
        "ExpiresAt": run.expires_at,
        "Step": run.step,
        "Phase": run.phase,
        "ToolRounds": run.tool_rounds,
        "PendingCalls": json.dumps([call.to_json() for call in run.pending_calls]),
        "Handle": _json(run.handle),
        "PollAttempt": run.poll_attempt,
        "TransientFailures": run.transient_failures,
        "ForceFinal": run.force_final,
        "Usage": _json(run.usage.to_json()),
        "Error": run.error or "",
        **split_text("UserMessage", run.user_message),
        **split_text("Answer", run.content or ""),
    }
    if run.started_at is not None:
        entity["StartedAt"] = run.started_at
    if run.ended_at is not None:
        entity["EndedAt"] = run.ended_at
    return entity


def run_from_entity(entity: dict[str, Any], etag: str | None) -> Run:
    pending = json.loads(entity.get("PendingCalls") or "[]")
    answer = join_text(entity, "Answer")
    epoch = datetime(1, 1, 1, tzinfo=UTC)
    return Run(
        run_id=str(entity["RunId"]),
        seq=int(entity.get("Seq") or 0),
        status=entity.get("Status") or "queued",
        request_id=str(entity.get("RequestId") or ""),
        user_message=join_text(entity, "UserMessage"),
        api=str(entity.get("Api") or "chat"),
        model=str(entity.get("Model") or ""),
        created_at=utc(entity.get("CreatedAt")) or epoch,
        expires_at=utc(entity.get("ExpiresAt")) or epoch,
        params=_json_dict(entity.get("Params")),
        reply_to=entity.get("ReplyTo") or None,
        step=int(entity.get("Step") or 0),
        phase=entity.get("Phase") or "model",
        tool_rounds=int(entity.get("ToolRounds") or 0),
        pending_calls=tuple(PendingCall.from_json(item) for item in pending),
        handle=_json_dict(entity.get("Handle")),
        poll_attempt=int(entity.get("PollAttempt") or 0),
        transient_failures=int(entity.get("TransientFailures") or 0),
        force_final=bool(entity.get("ForceFinal", False)),
        usage=Usage.from_json(_json_dict(entity.get("Usage"))),
        content=answer or None,
        error=entity.get("Error") or None,
        started_at=utc(entity.get("StartedAt")),
        ended_at=utc(entity.get("EndedAt")),
        etag=etag,
    )


def tool_results_prefix(run_id: str) -> str:
    return f"{TOOL_RESULT_PREFIX}{run_id}-"


def tool_result_row_key(run_id: str, call_id: str) -> str:
    """One tool call's result row (call ids may hold characters row keys can't)."""
    digest = hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:32]
    return f"{tool_results_prefix(run_id)}{digest}"


def tool_result_entity(chat_id: str, run_id: str, call_id: str, output: str) -> dict[str, Any]:
    """A finished tool call's output, kept until the step that ran it is stored, so that a
    redelivered step does not run the call again."""
    return {
        "PartitionKey": chat_id,
        "RowKey": tool_result_row_key(run_id, call_id),
        "RunId": run_id,
        "CallId": call_id,
        **split_text("Output", output),
    }
