"""Runs as values: a run's persisted state and what the model said (pure, no I/O)."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

# The statuses of the Assistants API, shared with the reply events.
from schemas.events import RunStatus as RunStatus

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired", "incomplete"})

# What the next step of a run does:
# "model"    call the model (or start a background response / remote run),
# "poll"     poll a background response / remote run that is still pending,
# "tools"    execute the local tool calls of the last model turn that may run now,
# "external" wait for producers (status requires_action): the outputs of external tools
#            (submitToolOutputs) and the decisions on calls that need approval
#            (submitToolApprovals).
Phase = Literal["model", "poll", "tools", "external"]
# The roles of a chat's messages, as the extension stores them.
Role = Literal["System", "User", "Assistant", "Tool"]


@dataclass(frozen=True)
class Decision:
    """A person's (or a service's) decision on a call that needed approval: kept with the
    call for good, as its audit trail (who, approve or deny, why, when)."""

    approve: bool
    at: datetime
    reason: str | None = None
    by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "approve": self.approve,
            "at": self.at.isoformat(),
            "reason": self.reason,
            "by": self.by,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Decision":
        reason, by = value.get("reason"), value.get("by")
        return cls(
            approve=bool(value.get("approve")),
            at=datetime.fromisoformat(str(value["at"])),
            reason=str(reason) if reason is not None else None,
            by=str(by) if by is not None else None,
        )


@dataclass(frozen=True)
class PendingCall:
    """A tool call of the current round that has no result yet."""

    id: str
    name: str
    arguments: str
    external: bool = False
    # The call waits for a decision (submitToolApprovals) before it may run.
    approval: bool = False
    # The decision, once taken (an approved call keeps it until its result is stored).
    decision: Decision | None = None
    # The MCP server of a ``server__tool`` call of one of the assistant's mcpServers.
    server: str | None = None

    @property
    def undecided(self) -> bool:
        """Waiting for a decision."""
        return self.approval and self.decision is None

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "arguments": self.arguments,
            "external": self.external,
        }
        # Written only when set: the rows of runs without approvals stay as they were.
        if self.approval:
            value["approval"] = True
        if self.decision is not None:
            value["decision"] = self.decision.to_json()
        if self.server is not None:
            value["server"] = self.server
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "PendingCall":
        decision = value.get("decision")
        server = value.get("server")
        return cls(
            id=str(value["id"]),
            name=str(value["name"]),
            arguments=str(value.get("arguments") or ""),
            external=bool(value.get("external", False)),
            approval=bool(value.get("approval", False)),
            decision=Decision.from_json(decision) if isinstance(decision, dict) else None,
            server=str(server) if server is not None else None,
        )


@dataclass(frozen=True)
class Usage:
    """Token usage, summed over a run's model calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )

    def to_json(self) -> dict[str, int]:
        return {
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "totalTokens": self.total_tokens,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> "Usage":
        value = value or {}
        return cls(
            int(value.get("promptTokens", 0)),
            int(value.get("completionTokens", 0)),
            int(value.get("totalTokens", 0)),
        )


@dataclass(frozen=True)
class StreamProgress:
    """How far a streamed run's deltas got (SPEC §4.5), kept with the run.

    ``calls``: the model calls the run completed, the ``step`` of the next delta;
    ``attempt``: the first attempt number the current model call's next try may use (a try
    that failed with a stored transient error leaves the next one here; a try lost in a crash
    is counted by its message's redelivery); ``deltas``: the deltas of the kept attempts of
    the completed calls, the reply's ``deltaCount``."""

    calls: int = 0
    attempt: int = 0
    deltas: int = 0

    def to_json(self) -> dict[str, int]:
        return {"calls": self.calls, "attempt": self.attempt, "deltas": self.deltas}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "StreamProgress":
        return cls(
            int(value.get("calls", 0)), int(value.get("attempt", 0)), int(value.get("deltas", 0))
        )


@dataclass(frozen=True)
class Run:
    """One conversation turn, as persisted in its ``run-`` row."""

    run_id: str
    seq: int
    status: RunStatus
    request_id: str
    user_message: str
    api: str
    model: str
    created_at: datetime
    expires_at: datetime
    params: dict[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    step: int = 0
    phase: Phase = "model"
    tool_rounds: int = 0
    pending_calls: tuple[PendingCall, ...] = ()
    # Ids of this round's calls that already have a result (external outputs arrive one
    # submit at a time): a repeated output for one of them is ignored, not an error.
    answered_calls: tuple[str, ...] = ()
    # Every call of the run (all rounds) that was decided, and how (approve or not): a later
    # decision for one of them is ignored (the first stands), even once the run moved on.
    decided_calls: tuple[tuple[str, bool], ...] = ()
    handle: dict[str, Any] = field(default_factory=dict)
    poll_attempt: int = 0
    transient_failures: int = 0
    force_final: bool = False
    usage: Usage = field(default_factory=Usage)
    content: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    etag: str | None = None
    # Set anew by every stored transition: tells which delivery's write landed.
    commit_id: str = ""
    # The queue message whose redelivery continues the run while one worker takes its steps
    # in-process (SPEC §5): the post or step it started from, held and renewed meanwhile.
    carrier: str = ""
    # The W3C trace context the run continues (the producer's, or its post's span): every
    # step and reply of the run carries it (SPEC §10).
    traceparent: str | None = None
    # Set for a run that streams its output (SPEC §5.4); None: it does not.
    stream: StreamProgress | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class ToolCallRef:
    """A tool call the model asked for."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ModelTurn:
    """What the model answered: text, tool calls, or both."""

    content: str | None
    tool_calls: tuple[ToolCallRef, ...] = ()
    usage: Usage = field(default_factory=Usage)
    handle: dict[str, Any] = field(default_factory=dict)
    # Why the answer was cut short (the token limit, a content filter), if it was.
    incomplete: str | None = None
    # A streamed call: the deltas its (kept) attempt sent.
    deltas: int = 0


@dataclass(frozen=True)
class Pending:
    """A background response / remote run is still working; ``handle`` names it."""

    handle: dict[str, Any]
    # A remote run that ended on its own (expired, cancelled, failed) instead of answering.
    ended: RunStatus | None = None
    error: str | None = None
