"""Objects of the fake Assistants API: threads, their messages, runs (with the run state
machine, see `fake_openai_assistants`), and cursor pages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from worker.testing.fake_openai_brain import Message, Reply, ToolCall
from worker.testing.fake_openai_chat import tool_names
from worker.testing.fake_openai_common import ApiError, new_id, wall_now

__all__ = ["ACTIVE", "Run", "Thread", "ThreadMessage", "function_tools", "page", "wall_of"]

ACTIVE = ("queued", "in_progress", "requires_action", "cancelling")


def wall_of(mono: float) -> int:
    """A monotonic instant as Unix seconds."""
    return int(time.time() - (time.monotonic() - mono))


@dataclass
class ThreadMessage:
    """One message of a thread."""

    id: str
    thread_id: str
    role: str
    text: str
    created_at: int = field(default_factory=wall_now)
    assistant_id: str | None = None
    run_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The `thread.message` object."""
        return {
            "id": self.id,
            "object": "thread.message",
            "created_at": self.created_at,
            "thread_id": self.thread_id,
            "role": self.role,
            "content": [{"type": "text", "text": {"value": self.text, "annotations": []}}],
            "assistant_id": self.assistant_id,
            "run_id": self.run_id,
            "attachments": [],
            "metadata": self.metadata,
            "status": "completed",
            "completed_at": self.created_at,
            "incomplete_at": None,
            "incomplete_details": None,
        }


@dataclass
class Run:
    """A run and the part of the conversation only the run sees (its tool calls and results)."""

    id: str
    thread_id: str
    assistant_id: str
    model: str
    instructions: str
    tools: list[Any]
    tool_names: list[str]
    tool_choice: Any
    extra: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    created_at: int = field(default_factory=wall_now)
    status: str = "queued"
    phase_start: float = field(default_factory=time.monotonic)
    pending: Reply | None = None
    steps: list[Message] = field(default_factory=list)
    required: list[ToolCall] = field(default_factory=list)
    started_at: int | None = None
    completed_at: int | None = None
    cancelled_at: int | None = None
    cancel_requested: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def advance(
        self, thread: Thread, *, delay: float, expiry: float, now: float | None = None
    ) -> None:
        """Bring the state up to `now` (monotonic), in time order: the decision, then expiry."""
        now = time.monotonic() if now is None else now
        expires = self.created + expiry
        if self.status == "cancelling" and self.cancel_requested is not None:
            if now > self.cancel_requested:
                self.status = "cancelled"
            return
        if self.status in ("queued", "in_progress"):
            decide_at = self.phase_start + delay
            if now >= decide_at and decide_at < expires and self.pending is not None:
                self._apply(thread, started=self.phase_start + delay / 4, at=decide_at)
            elif now >= self.phase_start + delay / 4:
                self.status = "in_progress"
                if self.started_at is None:
                    self.started_at = wall_of(self.phase_start + delay / 4)
        if self.status in ("queued", "in_progress", "requires_action") and now >= expires:
            self.status = "expired"
            self.required = []

    def _apply(self, thread: Thread, *, started: float, at: float) -> None:
        """Act on the decided reply: ask for tool outputs, or answer in the thread."""
        reply, self.pending = self.pending, None
        assert reply is not None
        if self.started_at is None:
            self.started_at = wall_of(started)
        if reply.tool_calls:
            self.status = "requires_action"
            self.required = list(reply.tool_calls)
            self.steps.append(
                Message(role="assistant", content=reply.content or "", tool_calls=reply.tool_calls)
            )
            return
        thread.messages.append(
            ThreadMessage(
                id=new_id("msg"),
                thread_id=thread.id,
                role="assistant",
                text=reply.content or "",
                created_at=wall_of(at),
                assistant_id=self.assistant_id,
                run_id=self.id,
            )
        )
        self.status = "completed"
        self.completed_at = wall_of(at)

    def to_json(self, expiry: float) -> dict[str, Any]:
        """The `thread.run` object."""
        active = self.status in ACTIVE
        required_action = None
        if self.status == "requires_action":
            required_action = {
                "type": "submit_tool_outputs",
                "submit_tool_outputs": {
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        }
                        for c in self.required
                    ]
                },
            }
        usage = None
        if self.status in ("completed", "failed", "cancelled", "expired", "incomplete"):
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            }
        return {
            "id": self.id,
            "object": "thread.run",
            "created_at": self.created_at,
            "thread_id": self.thread_id,
            "assistant_id": self.assistant_id,
            "status": self.status,
            "required_action": required_action,
            "last_error": None,
            "expires_at": wall_of(self.created + expiry) if active else None,
            "started_at": self.started_at,
            "cancelled_at": self.cancelled_at,
            "failed_at": None,
            "completed_at": self.completed_at,
            "incomplete_details": None,
            "model": self.model,
            "instructions": self.instructions,
            "tools": self.tools,
            "usage": usage,
            "tool_choice": self.tool_choice if self.tool_choice is not None else "auto",
            "truncation_strategy": {"type": "auto", "last_messages": None},
            "response_format": "auto",
            "parallel_tool_calls": True,
            "max_prompt_tokens": None,
            "max_completion_tokens": None,
            **self.extra,
        }


@dataclass
class Thread:
    """A thread: its messages in order, and its runs."""

    id: str
    metadata: dict[str, Any]
    created_at: int = field(default_factory=wall_now)
    messages: list[ThreadMessage] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The `thread` object."""
        return {
            "id": self.id,
            "object": "thread",
            "created_at": self.created_at,
            "metadata": self.metadata,
            "tool_resources": {},
        }


def function_tools(raw: list[Any] | None) -> list[Any]:
    tool_names(raw, nested=True)  # validates the shape
    return list(raw or [])


def page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """A cursor page (`order`, `limit`, `after`, `before`) over items in creation order."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"Invalid value for 'order': {order!r}.", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise ApiError(
            400, "Invalid value for 'limit': expected an integer.", param="limit"
        ) from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "'limit' must be between 1 and 100.", param="limit")
    ordered = items if order == "asc" else list(reversed(items))
    ids = [i["id"] for i in ordered]
    for key, cut in (("after", 1), ("before", 0)):
        cursor = query.get(key)
        if cursor is not None:
            if cursor not in ids:
                raise ApiError(400, f"Invalid value for '{key}': {cursor!r}.", param=key)
            at = ids.index(cursor)
            ordered, ids = (ordered[at + 1 :], ids[at + 1 :]) if cut else (ordered[:at], ids[:at])
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }
