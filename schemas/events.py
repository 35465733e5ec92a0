"""Events the worker writes: replies on ``replyTo`` queues, dead letters, and the query result."""

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from schemas.base import WireModel


class EventModel(WireModel):
    """Events are read back from JSON dicts (CLI, tests): lax types so ISO dates parse."""

    model_config = ConfigDict(strict=False)


RunStatus = Literal[
    "queued",
    "in_progress",
    "requires_action",
    "completed",
    "failed",
    "cancelled",
    "expired",
    "incomplete",
]
Role = Literal["System", "User", "Assistant", "Tool"]


class ApprovalAudit(EventModel):
    """The decision on a tool call that needed approval: who, approve or deny, why, when."""

    approved: bool
    by: str | None = None
    reason: str | None = None
    decided_at: datetime | None = None


class AssistantMessage(EventModel):
    """One message of ``AssistantState.recentMessages`` (the extension's shape, plus extras)."""

    content: str
    role: Role
    tool_calls: str = ""
    # Additive fields of the worker's own; the extension's readers ignore them.
    index: int | None = None
    created_at: datetime | None = None
    tool_call_id: str | None = None
    run_id: str | None = None
    # On a Tool message whose call needed approval: the decision (kept for good).
    approval: ApprovalAudit | None = None


class WaitingToolCall(EventModel):
    """A tool call an active run waits for: a decision (``approval``), an external tool's
    output (``output``), or its turn to run once nothing else waits (``run``, approved)."""

    id: str
    name: str
    arguments: str
    waits_for: Literal["approval", "output", "run"]
    server: str | None = None
    approval: ApprovalAudit | None = None


class RunSummary(EventModel):
    """A run as the query shows it."""

    run_id: str
    status: RunStatus
    created_at: datetime | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    # What the run waits for while it is active (requires_action: decisions and outputs).
    waiting_tool_calls: list[WaitingToolCall] = Field(default_factory=list)


class AssistantState(EventModel):
    """The extension's ``AssistantState``: what ``assistantQuery`` returns."""

    id: str
    exists: bool
    created_at: datetime | None = None
    last_updated_at: datetime | None = None
    total_messages: int = 0
    total_tokens: int = 0
    recent_messages: list[AssistantMessage] = Field(default_factory=list)
    runs: list[RunSummary] = Field(default_factory=list)


class Usage(EventModel):
    """Token usage of a run."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ReplyEvent(EventModel):
    """An event on a producer's ``replyTo`` queue: every field is always present (``null``
    when it has no value), so that consumers in any language can bind it to a fixed type."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True)


class AssistantReply(ReplyEvent):
    """Sent to ``replyTo`` when a run ends."""

    type: Literal["assistantReply"] = "assistantReply"
    id: str
    run_id: str
    request_id: str | None = None
    status: RunStatus
    content: str | None = None
    recent_messages: list[AssistantMessage] = Field(default_factory=list)
    usage: Usage | None = None
    error: str | None = None
    # The W3C trace context of the run, so a consumer can continue the producer's trace.
    traceparent: str | None = None
    # A streamed run: how many assistantDelta events its kept attempts sent (SPEC §4.5), so
    # that a consumer knows when it holds them all; null for a run that did not stream.
    delta_count: int | None = None


class DeltaToolCall(EventModel):
    """A tool call a streamed model call ended with (its arguments are in the reply)."""

    id: str
    name: str


class AssistantDelta(ReplyEvent):
    """Sent while a streamed run produces output (SPEC §5.4): the text the model wrote since
    the previous delta of the same model call. ``step`` numbers the run's model calls (0, 1,
    ...), ``attempt`` the tries of one (a try that started over sends under the next one),
    ``seq`` the deltas of one (step, attempt). The last delta of a model call carries the tool
    calls it ended with (else null). Keep each step's highest attempt, order by (step, seq),
    drop repeats; the reply's ``content`` is the truth."""

    type: Literal["assistantDelta"] = "assistantDelta"
    id: str
    run_id: str
    request_id: str | None = None
    step: int
    attempt: int
    seq: int
    text: str
    tool_calls: list[DeltaToolCall] | None = None


class ToolCallRequest(EventModel):
    """One external tool call a producer must answer."""

    id: str
    name: str
    arguments: str


class ToolCallsRequired(ReplyEvent):
    """Sent to ``replyTo`` when a run waits for external tool outputs."""

    type: Literal["toolCallsRequired"] = "toolCallsRequired"
    id: str
    run_id: str
    tool_calls: list[ToolCallRequest]
    traceparent: str | None = None
    # Set when the calls' arguments were too large for one queue message and were left out
    # (the whole calls are in the chat's state: ``assistant-worker state``).
    truncated: bool = False


class ApprovalCall(EventModel):
    """One tool call that waits for a decision."""

    id: str
    name: str
    arguments: str
    # The MCP server of a ``server__tool`` call, else null.
    server: str | None = None


class ToolApprovalRequired(ReplyEvent):
    """Sent to ``replyTo`` when a run waits for decisions on tool calls (SPEC §5.5)."""

    type: Literal["toolApprovalRequired"] = "toolApprovalRequired"
    id: str
    run_id: str
    request_id: str | None = None
    tool_calls: list[ApprovalCall]
    traceparent: str | None = None
    # Set when the calls' arguments were too large for one queue message and were cut (the
    # whole calls are in the chat's state: ``assistant-worker state``).
    truncated: bool = False


class DeadLetterInfo(EventModel):
    """Why and when a message was dead-lettered."""

    reason: str
    error_type: str
    queue: str
    message_id: str
    dequeue_count: int
    inserted_on: datetime | None = None
    dead_lettered_on: datetime
    request_id: str | None = None


class DeadLetterEnvelope(EventModel):
    """A message on a ``-poison`` queue: the original body and why it is there.

    ``message`` is the original body as JSON, or the raw text when it was not JSON.
    """

    dead_letter: DeadLetterInfo
    message: Any
