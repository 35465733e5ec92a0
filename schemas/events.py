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


class RunSummary(EventModel):
    """A run as the query shows it."""

    run_id: str
    status: RunStatus
    created_at: datetime | None = None
    usage: dict[str, int] | None = None
    error: str | None = None


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


class AssistantReply(EventModel):
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


class ToolCallRequest(EventModel):
    """One external tool call a producer must answer."""

    id: str
    name: str
    arguments: str


class ToolCallsRequired(EventModel):
    """Sent to ``replyTo`` when a run waits for external tool outputs."""

    type: Literal["toolCallsRequired"] = "toolCallsRequired"
    id: str
    run_id: str
    tool_calls: list[ToolCallRequest]


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
