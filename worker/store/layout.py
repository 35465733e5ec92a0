"""The table layout, as pure functions: row keys, entity <-> model, and the text split.

One partition per assistant id. ``state`` and ``msg-XXXX`` rows use the extension's property
names so that the extension can read chats the worker writes, and the other way round. Rows of
the worker's own use other prefixes, which the extension ignores. Text longer than a property
holds is split across properties losslessly; only text beyond what a whole row holds is cut,
with a marker, so that no write ever fails for size.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from worker.runs.model import Decision, PendingCall, Role, Run, StreamProgress, Usage

STATE_ROW = "state"
MESSAGE_PREFIX = "msg-"
REQUEST_PREFIX = "req-"
RUN_PREFIX = "run-"
# The first key after every "run-..." key.
RUN_PREFIX_END = "run."
# The first key after every "msg-XXXX" key ('.' sorts right after '-').
MESSAGE_PREFIX_END = "msg."
# Results of a run's local tool calls, stored as each call finishes
# (``tool-<runId>-<round:03d>-<hash of the call id>``).
TOOL_RESULT_PREFIX = "tool-"
CLAIM_PREFIX = "claim-"

# Azure's limits (see NOTES): a string property holds 64 KiB, i.e. 32,768 UTF-16 code units; an
# entity 1 MiB, counted with 2 bytes per UTF-16 unit. Text is measured in UTF-16 units so that
# characters outside the BMP (two units) count right.
MAX_PROPERTY_UNITS = 32_000
# What all the split texts of one row hold together (800,000 bytes), leaving more than 200 KiB of
# the entity's 1 MiB for its other properties and its keys. Beyond it, text is cut (``cap_text``).
MAX_TEXT_UNITS_PER_ROW = 400_000
# When a row's texts share its budget, each keeps at least this much (its marker included).
MIN_TEXT_UNITS = 1_000
# A run's error text is kept whole up to this size.
MAX_ERROR_UNITS = 16_000


def message_row_key(index: int) -> str:
    """``msg-0001``: 1-based, four uppercase hex digits (the extension's format)."""
    return f"{MESSAGE_PREFIX}{index:04X}"


def request_row_key(request_id: str) -> str:
    """The row recording that a request was applied (ids may hold characters keys can't)."""
    digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:40]
    return f"{REQUEST_PREFIX}{digest}"


def utf16_units(text: str) -> int:
    """The length of ``text`` as Table Storage counts it."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _utf16_pieces(text: str, max_units: int, limit: int | None = None) -> list[str]:
    """``text`` cut into pieces of at most ``max_units`` UTF-16 units each (never inside a
    surrogate pair), stopping after ``limit`` pieces when given."""
    if text.isascii():
        stop = len(text) if limit is None else min(len(text), limit * max_units)
        return [text[i : i + max_units] for i in range(0, stop, max_units)] or [""]
    data = text.encode("utf-16-le", "surrogatepass")
    pieces: list[str] = []
    start = 0
    step = 2 * max_units
    while start < len(data) and (limit is None or len(pieces) < limit):
        end = min(start + step, len(data))
        if end < len(data) and end - 2 > start:
            high = int.from_bytes(data[end - 2 : end], "little")
            low = int.from_bytes(data[end : end + 2], "little")
            if 0xD800 <= high <= 0xDBFF and 0xDC00 <= low <= 0xDFFF:
                end -= 2  # keep the pair together
        pieces.append(data[start:end].decode("utf-16-le", "surrogatepass"))
        start = end
    return pieces or [""]


def truncation_marker(max_units: int, received: int) -> str:
    """The note that ends a text cut by :func:`cap_text`."""
    return (
        f"\n\n[truncated by assistant-worker: the stored text is limited to {max_units} "
        f"characters per message; {received} characters were received]"
    )


def cap_text(text: str, max_units: int) -> str:
    """``text`` if it has at most ``max_units`` UTF-16 units; else its beginning followed by
    an explicit truncation marker, the whole at most ``max_units`` units long."""
    if utf16_units(text) <= max_units:
        return text
    marker = truncation_marker(max_units, utf16_units(text))
    room = max_units - utf16_units(marker)
    if room <= 0:  # a limit smaller than the marker: what fits of the marker
        return _utf16_pieces(marker, max_units, limit=1)[0] if max_units > 0 else ""
    return _utf16_pieces(text, room, limit=1)[0] + marker


def split_text(
    name: str, text: str, max_units: int = MAX_TEXT_UNITS_PER_ROW, *, counted: bool = False
) -> dict[str, Any]:
    """Store ``text`` under ``name``, spilling into ``{name}Part2``... when it is too long.

    The first chunk stays in ``name`` so that readers that know only the extension's layout
    still see the start of the text; ``{name}Parts`` says how many chunks there are (written
    even for one chunk when ``counted``, as rows updated by MERGE need, so that parts left
    from a longer text are ignored). Text beyond ``max_units`` is cut with a marker
    (:func:`cap_text`); this never raises.
    """
    chunks = _utf16_pieces(cap_text(text, max_units), MAX_PROPERTY_UNITS)
    properties: dict[str, Any] = {name: chunks[0]}
    if len(chunks) > 1 or counted:
        properties[f"{name}Parts"] = len(chunks)
    for number, chunk in enumerate(chunks[1:], start=2):
        properties[f"{name}Part{number}"] = chunk
    return properties


def split_texts(
    texts: Sequence[tuple[str, str]],
    budget: int = MAX_TEXT_UNITS_PER_ROW,
    *,
    counted: bool = False,
) -> dict[str, Any]:
    """Split the texts of one row (``(name, text)`` pairs) so that together they fit ``budget``.

    When they are too long together, each keeps at least ``MIN_TEXT_UNITS`` and the rest of
    the budget goes to the texts in the order given: list first the texts that must stay
    whole (JSON), last the ones that can best be cut.
    """
    sizes = [utf16_units(text) for _, text in texts]
    limits = list(sizes)
    if sum(sizes) > budget:
        limits = [min(size, MIN_TEXT_UNITS) for size in sizes]
        room = max(budget - sum(limits), 0)
        for index, size in enumerate(sizes):
            extra = min(size - limits[index], room)
            limits[index] += extra
            room -= extra
    properties: dict[str, Any] = {}
    for (name, text), limit in zip(texts, limits, strict=True):
        properties.update(split_text(name, text, limit, counted=counted))
    return properties


def join_text(entity: Mapping[str, Any], name: str) -> str:
    """The whole text that ``split_text`` stored under ``name``."""
    first = entity.get(name) or ""
    parts = int(entity.get(f"{name}Parts") or 1)
    return str(first) + "".join(str(entity.get(f"{name}Part{n}", "")) for n in range(2, parts + 1))


def entity_payload_bytes(entity: Mapping[str, Any]) -> int:
    """An upper estimate of an entity's size in a request or a transaction.

    Each string counts the larger of its stored size (2 bytes per UTF-16 unit) and its JSON
    on the wire (the SDK escapes every non-ASCII unit as ``\\uXXXX``: 6 bytes); names, type
    annotations and other values count a fixed overhead.
    """
    total = 0
    for name, value in entity.items():
        total += 2 * len(name) + 48
        if isinstance(value, str):
            total += max(2 * utf16_units(value), len(json.dumps(value)))
        else:
            total += 32
    return total


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
    """The ``state`` row of a chat: the extension's properties and the worker's own.

    ``Defaults`` and ``Remote`` are split like message content, with their part counts
    always written, because the row is updated by MERGE.
    """
    return {
        "PartitionKey": state.chat_id,
        "RowKey": STATE_ROW,
        "Exists": state.exists,
        "CreatedAt": state.created_at,
        "LastUpdatedAt": state.last_updated_at,
        "TotalMessages": state.total_messages,
        "TotalTokens": state.total_tokens,
        "ActiveRunId": state.active_run_id or "",
        "NextRunSeq": state.next_run_seq,
        **split_texts(
            [("Remote", _json(state.remote)), ("Defaults", _json(state.defaults))], counted=True
        ),
    }


def _json(value: Any) -> str:
    # Characters as they are: an escaped one takes 6 or 12 UTF-16 units of the row's budget.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


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
        defaults=_json_dict(join_text(entity, "Defaults")),
        etag=etag,
        active_run_id=entity.get("ActiveRunId") or None,
        next_run_seq=int(entity.get("NextRunSeq") or 1),
        remote=_json_dict(join_text(entity, "Remote")),
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
    # On the Tool message of a call that needed approval: the decision, for good (audit).
    decision: Decision | None = None


# The audit of a decision on the Tool message row of its call: properties of the worker's own,
# which the extension's readers ignore.
APPROVED, DENIED = "approved", "denied"


def decision_properties(decision: Decision) -> dict[str, Any]:
    """The ``Approval*`` properties of a Tool message row (who, approve or deny, why, when)."""
    properties: dict[str, Any] = {
        "Approval": APPROVED if decision.approve else DENIED,
        "ApprovalAt": decision.at,
    }
    if decision.by is not None:
        properties["ApprovalBy"] = decision.by
    if decision.reason is not None:
        properties["ApprovalReason"] = cap_text(decision.reason, MAX_ERROR_UNITS)
    return properties


def decision_from_entity(entity: Mapping[str, Any]) -> Decision | None:
    """The decision a Tool message row keeps, if its call needed approval."""
    verdict = entity.get("Approval")
    if verdict not in (APPROVED, DENIED):
        return None
    reason, by = entity.get("ApprovalReason"), entity.get("ApprovalBy")
    return Decision(
        approve=verdict == APPROVED,
        at=utc(entity.get("ApprovalAt")) or datetime(1, 1, 1, tzinfo=UTC),
        reason=str(reason) if reason is not None else None,
        by=str(by) if by is not None else None,
    )


def message_entity(chat_id: str, message: ChatMessage) -> dict[str, Any]:
    """A ``msg-`` row in the extension's layout, plus ``RunId``.

    ``ToolCalls`` and ``Content`` are split across properties when long (the first chunk
    keeps the extension's name) and share the row's budget, the tool calls first: only text
    beyond what a row holds is cut, with a marker.
    """
    entity: dict[str, Any] = {
        "PartitionKey": chat_id,
        "RowKey": message_row_key(message.index),
        "Role": message.role,
        "CreatedAt": message.created_at,
        **split_texts([("ToolCalls", message.tool_calls), ("Content", message.content)]),
    }
    if message.name is not None:
        entity["Name"] = message.name
    if message.run_id is not None:
        entity["RunId"] = message.run_id
    if message.decision is not None:
        entity.update(decision_properties(message.decision))
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
        tool_calls=join_text(entity, "ToolCalls"),
        run_id=entity.get("RunId") or None,
        decision=decision_from_entity(entity),
    )


@dataclass(frozen=True)
class AppliedRequest:
    """The record that a request took effect, written with that effect."""

    request_id: str
    message_type: str
    message_id: str
    applied_at: datetime
    run_id: str | None = None
    # The run's step right after this request took effect (a submit's resumed step), so a
    # redelivery re-sends only a follow-up the run has not moved past.
    step: int | None = None


@dataclass(frozen=True)
class AppliedRecord:
    """What a ``req-`` row says of an applied request: the run it made or resumed, and the
    run's step right after it."""

    run_id: str | None
    step: int | None


def applied_record_from_entity(entity: Mapping[str, Any]) -> AppliedRecord:
    step = entity.get("Step")
    return AppliedRecord(
        run_id=entity.get("RunId") or None, step=int(step) if step is not None else None
    )


def applied_request_entity(chat_id: str, applied: AppliedRequest) -> dict[str, Any]:
    """The ``req-`` row recording that a request took effect (and the run it created)."""
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
    if applied.step is not None:
        entity["Step"] = applied.step
    return entity


def run_row_key(run_id: str) -> str:
    """``run-<runId>``: run ids (``run_<seq:06d>_<random>``) sort in arrival order."""
    return f"{RUN_PREFIX}{run_id}"


def run_seq_bound(after_seq: int) -> str:
    """The first row key after those of every run with a sequence number up to ``after_seq``
    (6 digits), for a range query of the later runs.

    Run ids are ``run_<seq:06d>_<random>``: every key of sequence ``s`` starts with
    ``run-run_<s:06d>_`` and ``'`'`` is the character right after ``'_'``.
    """
    return f"{RUN_PREFIX}run_{max(after_seq, 0):06d}`"


def run_entity(chat_id: str, run: Run) -> dict[str, Any]:
    """A run row. Its texts are split like message content and share the row's budget, the
    JSON that must stay whole first, so no size bricks it; the final answer is not kept here
    (it is the run's last Assistant message)."""
    entity: dict[str, Any] = {
        "PartitionKey": chat_id,
        "RowKey": run_row_key(run.run_id),
        "RunId": run.run_id,
        "Seq": run.seq,
        "Status": run.status,
        "RequestId": run.request_id,
        "Api": run.api,
        "Model": run.model,
        "ReplyTo": run.reply_to or "",
        "CreatedAt": run.created_at,
        "ExpiresAt": run.expires_at,
        "Step": run.step,
        "CommitId": run.commit_id,
        "Carrier": run.carrier,
        "TraceParent": run.traceparent or "",
        "Phase": run.phase,
        "ToolRounds": run.tool_rounds,
        "PollAttempt": run.poll_attempt,
        "TransientFailures": run.transient_failures,
        "ForceFinal": run.force_final,
        "Error": cap_text(run.error or "", MAX_ERROR_UNITS),
        **split_texts(
            [
                ("Usage", _json(run.usage.to_json())),
                ("PendingCalls", pending_calls_json(run.pending_calls)),
                ("CallsAnswered", _json(list(run.answered_calls))),
                ("CallsDecided", _json([list(pair) for pair in run.decided_calls])),
                ("Handle", _json(run.handle)),
                ("Params", _json(run.params)),
                ("UserMessage", run.user_message),
            ]
        ),
    }
    if run.started_at is not None:
        entity["StartedAt"] = run.started_at
    if run.ended_at is not None:
        entity["EndedAt"] = run.ended_at
    if run.stream is not None:
        entity["Stream"] = _json(run.stream.to_json())
    return entity


# UTF-16 units the pending calls' JSON may take in a run row (the row holds about 400,000).
PENDING_CALLS_UNITS = 300_000


def pending_calls_json(calls: Sequence[PendingCall]) -> str:
    """The pending calls as JSON that always fits its share of the run row.

    Cutting the JSON itself would leave text that parses as no calls at all, and the run would
    go on as if the model had asked for nothing. Instead each call's arguments are cut (with a
    marker) until the whole fits: every call is kept, and one whose arguments were cut gets
    a tool result saying its arguments are invalid.
    """
    text = _json([call.to_json() for call in calls])
    if utf16_units(text) <= PENDING_CALLS_UNITS or not calls:
        return text
    share = PENDING_CALLS_UNITS // (2 * len(calls))
    while True:
        cut = [replace(call, arguments=cap_text(call.arguments, share)) for call in calls]
        text = _json([call.to_json() for call in cut])
        if utf16_units(text) <= PENDING_CALLS_UNITS or share <= MIN_TEXT_UNITS:
            return text
        share //= 2


def _json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def run_from_entity(entity: dict[str, Any], etag: str | None) -> Run:
    """A run row with its ETag, as a run; ``content`` is None (the answer is a message)."""
    pending = _json_list(join_text(entity, "PendingCalls"))
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
        params=_json_dict(join_text(entity, "Params")),
        reply_to=entity.get("ReplyTo") or None,
        step=int(entity.get("Step") or 0),
        commit_id=str(entity.get("CommitId") or ""),
        carrier=str(entity.get("Carrier") or ""),
        traceparent=entity.get("TraceParent") or None,
        phase=entity.get("Phase") or "model",
        tool_rounds=int(entity.get("ToolRounds") or 0),
        pending_calls=tuple(PendingCall.from_json(item) for item in pending),
        answered_calls=tuple(str(i) for i in _json_list(join_text(entity, "CallsAnswered"))),
        decided_calls=tuple(
            (str(pair[0]), bool(pair[1]))
            for pair in _json_list(join_text(entity, "CallsDecided"))
            if isinstance(pair, list) and len(pair) == 2
        ),
        handle=_json_dict(join_text(entity, "Handle")),
        poll_attempt=int(entity.get("PollAttempt") or 0),
        transient_failures=int(entity.get("TransientFailures") or 0),
        force_final=bool(entity.get("ForceFinal", False)),
        usage=Usage.from_json(_json_dict(join_text(entity, "Usage"))),
        content=None,
        error=entity.get("Error") or None,
        started_at=utc(entity.get("StartedAt")),
        ended_at=utc(entity.get("EndedAt")),
        etag=etag,
        stream=StreamProgress.from_json(_json_dict(entity["Stream"]))
        if entity.get("Stream")
        else None,
    )


def tool_results_prefix(run_id: str, round_number: int) -> str:
    """The key prefix of the tool-result rows of one tool round of a run.

    The round is part of the key because OpenAI-compatible servers may reuse call ids across
    rounds.
    """
    return f"{TOOL_RESULT_PREFIX}{run_id}-{round_number:03d}-"


def tool_result_row_key(run_id: str, round_number: int, call_id: str) -> str:
    """One tool call's result row (call ids may hold characters row keys can't)."""
    digest = hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:32]
    return f"{tool_results_prefix(run_id, round_number)}{digest}"


def tool_result_entity(
    chat_id: str, run_id: str, round_number: int, call_id: str, output: str
) -> dict[str, Any]:
    """A finished tool call's output, kept until the step that ran it is stored, so that a
    redelivered step does not run the call again. An output larger than a row holds is cut,
    with a marker."""
    return {
        "PartitionKey": chat_id,
        "RowKey": tool_result_row_key(run_id, round_number, call_id),
        "RunId": run_id,
        "Round": round_number,
        "CallId": call_id,
        **split_text("Output", output),
    }
