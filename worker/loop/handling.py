"""The contract between the worker loop and the message handlers.

A handler gets a validated message and its context, makes its effect durable in the store,
and returns a ``HandlerResult`` naming what should be sent next. It never touches the queue it
was delivered from: the loop sends the effects, then acks, retries or dead-letters.
"""

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas import Message
from worker.loop.errors import PermanentError

QueueRole = Literal["requests", "runs", "deadlines"]


@dataclass(frozen=True)
class Send:
    """An effect: put ``payload`` on ``queue`` after ``delay`` seconds."""

    queue: str
    payload: dict[str, Any]
    delay: float = 0.0
    # A producer's queue (replies, events): a failure to send is logged, not retried. The
    # run's state is in the chat; a producer that missed an event can query it.
    best_effort: bool = False
    # A step of the run the handled message carries, due now: the loop may take it at once
    # in this process instead of sending it (SPEC §5); the message stays leased meanwhile.
    in_process: bool = False


@dataclass(frozen=True)
class HandlerResult:
    """What a handler did (``note``, for the log line) and what the loop should send."""

    note: str
    effects: tuple[Send, ...] = ()
    log_fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MessageContext:
    """Delivery facts a handler may need; ``request_id`` falls back to the message id."""

    queue: str
    message_id: str
    dequeue_count: int
    request_id: str
    # Set when the message was delivered more often than allowed (earlier attempts may have
    # crashed the worker): a handler that can end its work safely does so, saying why.
    give_up: str | None = None
    # A step taken in-process after the handled message (``message_id`` is that message's,
    # the run's carrier): not a delivery of its own.
    in_process: bool = False
    # Whether a step the handler leaves due now is taken in this process (the loop's
    # WORKER_IN_PROCESS_STEPS), so that work for it may be claimed ahead.
    continues_here: bool = False
    # The worker is stopping and sends this step (due in-process) to the queue instead: the
    # handler gives back what this process holds for it, and does not do the step.
    handing_off: bool = False


Handler = Callable[[Any, MessageContext], Awaitable[HandlerResult]]


class HandlerRegistry:
    """Which handler serves which message type, per queue role. Passed to the worker."""

    def __init__(
        self,
        requests: Mapping[str, Handler],
        runs: Mapping[str, Handler],
        deadlines: Mapping[str, Handler] | None = None,
    ) -> None:
        self._handlers: dict[QueueRole, Mapping[str, Handler]] = {
            "requests": dict(requests),
            "runs": dict(runs),
            "deadlines": dict(deadlines or {}),
        }

    def handler_for(self, role: QueueRole, message: Message) -> Handler:
        handlers = self._handlers[role]
        handler = handlers.get(message.type)
        if handler is not None:
            return handler
        for other, served in self._handlers.items():
            if other != role and message.type in served:
                raise PermanentError(
                    f"{message.type} messages belong on the {other} queue, not the {role} queue",
                    error_type="WrongQueue",
                )
        raise PermanentError(
            f"this worker has no handler for {message.type} messages yet",
            error_type="UnsupportedMessageType",
        )
