"""What the run handlers share: their services, and storing a transition with its follow-ups.

Storing is optimistic: the chat's ``state`` row and the run's row are written under their
ETags in one transaction. When only the state changed meanwhile (another post arrived), the
transition is re-applied to the fresh state; when the run itself changed, another delivery
of the same step got there first and this one is dropped (``StaleRun``).
"""

import asyncio
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from handlers.query import to_assistant_message
from handlers.tools import ToolRegistry
from schemas import (
    AssistantReply,
    RunDeadline,
    RunStep,
    ToolCallRequest,
    ToolCallsRequired,
    encode_body,
)
from schemas.decode import Encoding
from schemas.events import Usage as UsageEvent
from worker.backends.base import Backend, TurnRequest
from worker.deadletter import MAX_MESSAGE_BYTES
from worker.errors import TransientError
from worker.handling import Send
from worker.runs import machine
from worker.runs.machine import NewMessage, Transition
from worker.runs.model import Run
from worker.settings import Settings
from worker.store.layout import AppliedRequest, ChatMessage, ChatState
from worker.store.tables import ChatStores, Conflict, TableChatStore

MAX_CONFLICT_RETRIES = 25

log = structlog.get_logger("worker.runs")


class StaleRun(Exception):
    """The run changed under us: another delivery of this step already advanced it, or our
    own write landed and only its answer was lost (then the run carries ``commit_id``)."""

    def __init__(self, run_id: str, commit_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id
        self.commit_id = commit_id


@dataclass(frozen=True)
class ChatRef:
    """Where a chat lives: its id, storage setting and table."""

    chat_id: str
    storage_setting: str
    collection: str


@dataclass
class RunServices:
    """The long-lived parts the run handlers use."""

    stores: ChatStores
    settings: Settings
    backends: Mapping[str, Backend]
    tools: ToolRegistry
    clock: Callable[[], datetime]
    # Masks the worker's secrets in texts that leave it (run errors in replies).
    redact: Callable[[str], str] = lambda text: text

    async def store(self, chat: ChatRef) -> TableChatStore:
        return await self.stores.get(chat.storage_setting, chat.collection)

    async def cancel_remote(self, run: Run, remote: Mapping[str, Any]) -> None:
        """Stop the backend work of a run the worker abandons (expired, failed, cancelled,
        its chat deleted or reset): a background response or remote run would otherwise go
        on burning tokens. Best effort: a failure is logged, never raised."""
        backend = self.backends.get(run.api)
        if backend is None or not (run.handle or remote):
            return
        request = TurnRequest(
            chat_id="",
            run_id=run.run_id,
            model=run.model,
            messages=(),
            handle=dict(run.handle),
            remote=dict(remote),
            ai_connection=run.params.get("aiConnectionName"),
        )
        try:
            await backend.cancel(request)
        except Exception as error:
            log.warning(
                "run.cancel_remote_failed", run_id=run.run_id, error=self.redact(str(error))
            )


def new_run_id(seq: int) -> str:
    """Sortable by arrival (the sequence), unique across resets (the random part)."""
    return f"run_{seq:06d}_{uuid.uuid4().hex[:10]}"


def step_send(services: RunServices, chat: ChatRef, run: Run, delay: float = 0.0) -> Send:
    """The runStep message for the run's current step."""
    step = RunStep(
        id=chat.chat_id,
        run_id=run.run_id,
        step=run.step,
        collection_name=chat.collection,
        chat_storage_connection_setting=chat.storage_setting,
        traceparent=run.traceparent,
    )
    return Send(services.settings.runs_queue, step.to_wire(), delay=delay)


def deadline_send(services: RunServices, chat: ChatRef, run: Run) -> Send:
    """The watchdog of a run that starts: due just after its deadline (SPEC: no run stays
    active past it, whatever happened to its steps)."""
    deadline = RunDeadline(
        id=chat.chat_id,
        run_id=run.run_id,
        collection_name=chat.collection,
        chat_storage_connection_setting=chat.storage_setting,
        traceparent=run.traceparent,
    )
    delay = machine.until_expiry(run, services.clock())
    return Send(services.settings.deadlines_queue, deadline.to_wire(), delay=delay)


def start_sends(services: RunServices, chat: ChatRef, run: Run) -> tuple[Send, Send]:
    """What a run that becomes active needs: its first step and its deadline."""
    return (step_send(services, chat, run), deadline_send(services, chat, run))


def user_message(run: Run, index: int, now: datetime) -> ChatMessage:
    return ChatMessage(index, "User", run.user_message, now, run_id=run.run_id)


async def commit_transition(
    services: RunServices,
    store: TableChatStore,
    chat: ChatRef,
    before: Run,
    transition: Transition,
    *,
    applied: AppliedRequest | None = None,
    state: ChatState | None = None,
    deletes: Sequence[str] = (),
) -> tuple[Send, ...]:
    """Store ``transition`` of ``before`` and return the messages to send after it.

    When the run finishes, the chat's next queued run starts in the same transaction: its
    user message is appended then, so the history always reads User, tool rounds, Assistant.
    """
    for attempt in range(MAX_CONFLICT_RETRIES):
        now = services.clock()
        # The caller's state saves a read when nothing changed meanwhile (the usual case);
        # after a conflict it is read again.
        if state is None or attempt > 0:
            state = await store.load_state(chat.chat_id)
        if state is None:
            return ()  # the chat was deleted meanwhile: its runs went with it
        run = replace(transition.run, etag=before.etag, commit_id=uuid.uuid4().hex)
        index = state.total_messages
        messages = []
        for message in transition.messages:
            index += 1
            messages.append(_stored(message, index, run, now))
        runs: list[tuple[Run, bool]] = [(run, False)]
        follow_ups: tuple[Send, ...] = ()
        active = state.active_run_id
        if run.finished and active == run.run_id:
            # The chat's next queued run starts in the same transaction.
            nxt = await _next_run(services, store, chat, run.seq, index, now)
            active = nxt.run_id
            if nxt.run is not None:
                index += 1
                messages.extend([nxt.message] if nxt.message is not None else [])
                runs.append((nxt.run, False))
                follow_ups = nxt.sends
        tokens = transition.last_total_tokens
        changed = replace(
            state,
            total_messages=index,
            last_updated_at=now,
            total_tokens=tokens if tokens is not None else state.total_tokens,
            active_run_id=active,
            remote={**state.remote, **(transition.remote or {})},
        )
        try:
            await store.commit(
                changed, runs=runs, messages=messages, applied=applied, deletes=deletes
            )
        except Conflict:
            current = await store.load_run(chat.chat_id, run.run_id)
            if current is None or current.etag != before.etag:
                raise StaleRun(run.run_id, run.commit_id) from None
            # Only the state changed (a post arrived): decide again on the fresh state.
            await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))
            continue
        if run.status in ("expired", "cancelled", "failed") and not before.finished:
            # Expired, failed or cancelled mid-way: the backend may still be working on it.
            await services.cancel_remote(run, state.remote)
        replies = await _replies(services, store, chat, run)
        return (*_transition_sends(services, chat, run, transition), *follow_ups, *replies)
    raise TransientError(f"the chat {chat.chat_id!r} kept changing; retrying the step later")


async def release_chat(
    services: RunServices, store: TableChatStore, chat: ChatRef, state: ChatState, run_id: str
) -> tuple[Send, ...]:
    """The chat's active run ``run_id`` has no row any more (a reset or delete that failed
    half-way removed it): the chat must not wait for it. Its next queued run starts."""
    for _ in range(MAX_CONFLICT_RETRIES):
        if state.active_run_id != run_id:
            return ()
        now = services.clock()
        nxt = await _next_run(services, store, chat, -1, state.total_messages, now)
        messages = [nxt.message] if nxt.message is not None else []
        runs = [(nxt.run, False)] if nxt.run is not None else []
        changed = replace(
            state,
            total_messages=state.total_messages + len(messages),
            last_updated_at=now,
            active_run_id=nxt.run_id,
        )
        try:
            await store.commit(changed, runs=runs, messages=messages)
        except Conflict:
            fresh = await store.load_state(chat.chat_id)
            if fresh is None:
                return ()
            state = fresh
            continue
        return nxt.sends
    raise TransientError(f"the chat {chat.chat_id!r} kept changing; retrying later")


@dataclass(frozen=True)
class NextRun:
    """The chat's next queued run, started (or nothing queued: all None)."""

    run: Run | None = None
    message: ChatMessage | None = None
    sends: tuple[Send, ...] = ()

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None


async def _next_run(
    services: RunServices,
    store: TableChatStore,
    chat: ChatRef,
    after_seq: int,
    last_index: int,
    now: datetime,
) -> NextRun:
    """Start the first run queued after ``after_seq``: its user message is appended now (after
    message ``last_index``), so the history reads User, tool rounds, Assistant, User..."""
    queued = await store.next_queued_run(chat.chat_id, after_seq)
    if queued is None:
        return NextRun()
    started = machine.start(queued, now, services.settings.run_timeout)
    message = user_message(started, last_index + 1, now)
    return NextRun(started, message, start_sends(services, chat, started))


def _stored(message: NewMessage, index: int, run: Run, now: datetime) -> ChatMessage:
    return ChatMessage(
        index,
        message.role,
        message.content,
        now,
        name=message.tool_call_id,
        tool_calls=message.tool_calls,
        run_id=run.run_id,
    )


def _transition_sends(
    services: RunServices, chat: ChatRef, run: Run, transition: Transition
) -> list[Send]:
    sends = []
    if transition.next_step_delay is not None and not run.finished:
        sends.append(step_send(services, chat, run, transition.next_step_delay))
    if transition.announce_tool_calls and run.reply_to:
        encoding = services.settings.message_encoding
        sends.append(tool_calls_required(chat, run, run.reply_to, encoding))
    return sends


def tool_calls_required(chat: ChatRef, run: Run, reply_to: str, encoding: Encoding) -> Send:
    """The ``toolCallsRequired`` event of a run waiting for external tool outputs, cut to
    fit one queue message (see :func:`fit_tool_calls`)."""
    event = ToolCallsRequired(
        id=chat.chat_id,
        run_id=run.run_id,
        tool_calls=[
            ToolCallRequest(id=call.id, name=call.name, arguments=call.arguments)
            for call in run.pending_calls
            if call.external
        ],
        traceparent=run.traceparent,
    )
    return Send(reply_to, fit_tool_calls(event, encoding), best_effort=True)


async def _replies(
    services: RunServices, store: TableChatStore, chat: ChatRef, run: Run
) -> list[Send]:
    if not run.finished or not run.reply_to:
        return []
    payload = await reply_payload(
        store, chat, run, services.settings.message_encoding, services.redact
    )
    return [Send(run.reply_to, payload, best_effort=True)]


async def lost_follow_ups(
    services: RunServices, store: TableChatStore, chat: ChatRef, run: Run, active: str | None
) -> tuple[Send, ...]:
    """What the step that brought ``run`` to its current state had to send, sent again.

    For the redelivery of that step after it stored its transition but failed to send
    (a queue error, a reply that did not fit): the next step, the reply of a finished run
    and the first step of the run its end started, or the toolCallsRequired event. Each is
    idempotent for its consumer (a step acts once; replies and events carry the run id).
    """
    if not run.finished:
        if active != run.run_id:
            return ()
        if run.phase == "external":
            if not run.reply_to:
                return ()
            encoding = services.settings.message_encoding
            return (tool_calls_required(chat, run, run.reply_to, encoding),)
        return (step_send(services, chat, run),)
    sends = await _replies(services, store, chat, run)
    if active and active != run.run_id:
        started = await store.load_run(chat.chat_id, active)
        if started is not None and started.seq > run.seq and started.step == 0:
            sends.extend(start_sends(services, chat, started))
    return tuple(sends)


async def end_removed_runs(
    services: RunServices, chat_id: str, runs: Sequence[Run], reason: str
) -> tuple[Send, ...]:
    """The runs a delete or reset removed: those that had not ended stop their remote work,
    and their producers get an ``assistantReply`` with status cancelled."""
    sends = []
    for run in runs:
        if run.finished:
            continue
        await services.cancel_remote(run, {})
        if not run.reply_to:
            continue
        reply = AssistantReply(
            id=chat_id,
            run_id=run.run_id,
            request_id=run.request_id,
            status="cancelled",
            error=reason,
            traceparent=run.traceparent,
        )
        sends.append(Send(run.reply_to, reply.to_wire(), best_effort=True))
    return tuple(sends)


# Appended to a reply's content when the whole text does not fit one queue message.
REPLY_CUT = (
    "\n\n[truncated by assistant-worker: showing {shown:,} of {total:,} characters; "
    "the whole text is in the chat (assistant-worker state)]"
)


async def reply_payload(
    store: TableChatStore,
    chat: ChatRef,
    run: Run,
    encoding: Encoding = "none",
    redact: Callable[[str], str] = lambda text: text,
) -> dict[str, Any]:
    """The ``assistantReply`` event of a finished run, with the messages it wrote."""
    messages = await store.run_messages(chat.chat_id, run.run_id)
    # A run row does not keep the answer (it may be large): the chat has it.
    answers = [m.content for m in messages if m.role == "Assistant" and not m.tool_calls]
    content = run.content if run.content is not None else (answers[-1] if answers else None)
    reply = AssistantReply(
        id=chat.chat_id,
        run_id=run.run_id,
        request_id=run.request_id,
        status=run.status,
        content=content,
        recent_messages=[to_assistant_message(message) for message in messages],
        usage=UsageEvent(
            prompt_tokens=run.usage.prompt_tokens,
            completion_tokens=run.usage.completion_tokens,
            total_tokens=run.usage.total_tokens,
        ),
        error=redact(run.error) if run.error is not None else None,
        traceparent=run.traceparent,
    )
    return fit_reply(reply, encoding)


def fit_reply(reply: AssistantReply, encoding: Encoding) -> dict[str, Any]:
    """The reply as a payload that fits one queue message (64 KiB): the oldest of
    ``recentMessages`` are left out first, then ``content`` and ``error`` are cut, with a
    marker. The chat itself always keeps the whole text."""

    def fits(candidate: AssistantReply) -> bool:
        return len(encode_body(candidate.to_wire(), encoding).encode("utf-8")) <= MAX_MESSAGE_BYTES

    if fits(reply):
        return reply.to_wire()
    messages = list(reply.recent_messages)
    # Binary search for the fewest oldest messages to leave out (each try re-encodes).
    low, high = 1, len(messages)
    while low <= high:
        middle = (low + high) // 2
        if fits(reply.model_copy(update={"recent_messages": messages[middle:]})):
            high = middle - 1
        else:
            low = middle + 1
    if low <= len(messages):
        return reply.model_copy(update={"recent_messages": messages[low:]}).to_wire()
    bare = reply.model_copy(update={"recent_messages": [], "error": _cut(reply.error, 8_000)})
    content = reply.content or ""
    keep = len(content)
    while keep > 0:
        keep //= 2
        candidate = bare.model_copy(update={"content": _cut(content, keep)})
        if fits(candidate):
            return candidate.to_wire()
    return bare.model_copy(update={"content": _cut(content, 0)}).to_wire()


def _cut(text: str | None, keep: int) -> str | None:
    if text is None or len(text) <= keep:
        return text
    return text[:keep] + REPLY_CUT.format(shown=keep, total=len(text))


# Appended to a tool call's arguments when the calls do not fit one queue message.
ARGUMENTS_CUT = (
    "\n\n[truncated by assistant-worker: showing {shown:,} of {total:,} characters; "
    "the whole call is in the chat (assistant-worker state)]"
)


def fit_tool_calls(event: ToolCallsRequired, encoding: Encoding) -> dict[str, Any]:
    """The event as a payload that fits one queue message (64 KiB).

    Every call keeps its id and name (a producer must be able to answer each one); the
    longest arguments are cut first, all of them to the same largest length that fits, each
    with a marker, and the event says ``truncated``. The chat keeps the whole calls."""

    def payload(keep: int) -> dict[str, Any]:
        calls = [
            call
            if len(call.arguments) <= keep
            else call.model_copy(
                update={
                    "arguments": call.arguments[:keep]
                    + ARGUMENTS_CUT.format(shown=keep, total=len(call.arguments))
                }
            )
            for call in event.tool_calls
        ]
        return event.model_copy(update={"tool_calls": calls, "truncated": True}).to_wire()

    def fits(candidate: dict[str, Any]) -> bool:
        return len(encode_body(candidate, encoding).encode("utf-8")) <= MAX_MESSAGE_BYTES

    whole = event.to_wire()
    if fits(whole):
        return whole
    # Binary search for the most characters every call's arguments may keep.
    low, high = 0, max((len(call.arguments) for call in event.tool_calls), default=1) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(payload(middle)):
            low = middle
        else:
            high = middle - 1
    # At 0 it may still not fit (thousands of calls): the ids and names are never dropped,
    # and a send the queue refuses is logged (the calls are in the chat's state).
    return payload(low)
