"""Storing a run's transition with its follow-ups (the next step, the deadline, the next
queued run), and re-sending the follow-ups a failed delivery may have lost.

Storing is optimistic: the chat's ``state`` row and the run's row are written under their
ETags in one transaction. When only the state changed meanwhile (another post arrived), the
transition is re-applied to the fresh state; when the run itself changed, another delivery
of the same step got there first and this one is dropped (``StaleRun``).
"""

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import structlog

from handlers.replies import replies_of, tool_approval_required, tool_calls_required, waiting_events
from handlers.services import ChatRef, RunServices
from schemas import (
    RunDeadline,
    RunStep,
)
from worker.loop.errors import TransientError
from worker.loop.handling import Send
from worker.runs import machine
from worker.runs.machine import NewMessage, Transition
from worker.runs.model import Run
from worker.store.claims import NewClaim
from worker.store.layout import AppliedRequest, ChatMessage, ChatState
from worker.store.protocol import ChatStore, Conflict

MAX_CONFLICT_RETRIES = 25

log = structlog.get_logger("worker.runs")


class StaleRun(Exception):
    """The run changed under us: another delivery of this step already advanced it, or our
    own write landed and only its answer was lost (then the run carries ``commit_id``)."""

    def __init__(self, run_id: str, commit_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id
        self.commit_id = commit_id


def new_run_id(seq: int) -> str:
    """Sortable by arrival (the sequence), unique across resets (the random part)."""
    return f"run_{seq:06d}_{uuid.uuid4().hex[:10]}"


def step_send(
    services: RunServices, chat: ChatRef, run: Run, delay: float = 0.0, *, in_process: bool = False
) -> Send:
    """The runStep message for the run's current step; ``in_process``: the worker holding
    the run's carrier may take it at once instead (only a step due now)."""
    step = RunStep(
        id=chat.chat_id,
        run_id=run.run_id,
        step=run.step,
        collection_name=chat.collection,
        chat_storage_connection_setting=chat.storage_setting,
        traceparent=run.traceparent,
        request_id=run.request_id or None,
    )
    return Send(
        services.settings.runs_queue,
        step.to_wire(),
        delay=delay,
        in_process=in_process and delay == 0,
    )


def deadline_send(services: RunServices, chat: ChatRef, run: Run) -> Send:
    """The watchdog of a run that starts: due just after its deadline (SPEC: no run stays
    active past it, whatever happened to its steps)."""
    deadline = RunDeadline(
        id=chat.chat_id,
        run_id=run.run_id,
        collection_name=chat.collection,
        chat_storage_connection_setting=chat.storage_setting,
        traceparent=run.traceparent,
        request_id=run.request_id or None,
    )
    delay = machine.until_expiry(run, services.clock())
    return Send(services.settings.deadlines_queue, deadline.to_wire(), delay=delay)


def start_sends(
    services: RunServices, chat: ChatRef, run: Run, *, in_process: bool = False
) -> tuple[Send, Send]:
    """What a run that becomes active needs: its watchdog, then its first step. The loop
    sends effects in order and stops at the first that fails, so a run never has a step out
    without its watchdog (SPEC §5: the watchdog goes before the first step)."""
    step = step_send(services, chat, run, in_process=in_process)
    return (deadline_send(services, chat, run), step)


def user_message(run: Run, index: int, now: datetime) -> ChatMessage:
    return ChatMessage(index, "User", run.user_message, now, run_id=run.run_id)


async def commit_transition(
    services: RunServices,
    store: ChatStore,
    chat: ChatRef,
    before: Run,
    transition: Transition,
    *,
    applied: AppliedRequest | None = None,
    state: ChatState | None = None,
    deletes: Sequence[str] = (),
    carrier: str | None = None,
    claims: Sequence[NewClaim] = (),
) -> tuple[Send, ...]:
    """Store ``transition`` of ``before`` and return the messages to send after it.

    When the run finishes, the chat's next queued run starts in the same transaction: its
    user message is appended then, so the history always reads User, tool rounds, Assistant.
    ``carrier``: the id of the message the caller holds; its next step, if due now, may be
    taken in-process, and the run records the carrier so that a redelivery of that message
    continues the run if this worker dies in between (SPEC §5).
    """
    for attempt in range(MAX_CONFLICT_RETRIES):
        now = services.clock()
        # The caller's state saves a read when nothing changed meanwhile (the usual case);
        # after a conflict it is read again.
        if state is None or attempt > 0:
            state = await store.load_state(chat.chat_id)
        if state is None:
            return ()  # the chat was deleted meanwhile: its runs went with it
        run = replace(
            transition.run, etag=before.etag, commit_id=uuid.uuid4().hex, carrier=carrier or ""
        )
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
            nxt = await _next_run(services, store, chat, run.seq, index, now, state.next_run_seq)
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
                changed, runs=runs, messages=messages, applied=applied, deletes=deletes,
                claims=claims,
            )  # fmt: skip
        except Conflict:
            current = await store.load_run(chat.chat_id, run.run_id)
            if current is None or current.etag != before.etag:
                raise StaleRun(run.run_id, run.commit_id) from None
            # Only the state changed (a post arrived): decide again on the fresh state.
            await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))
            continue
        if run.finished and not before.finished:
            _log_ended(run, chat)
        if run.status in ("expired", "cancelled", "failed") and not before.finished:
            # Expired, failed or cancelled mid-way: the backend may still be working on it.
            await services.cancel_remote(run, state.remote)
        replies = await replies_of(services, store, chat, run, changed)
        steps = _transition_sends(services, chat, run, transition, in_process=bool(carrier))
        return (*steps, *follow_ups, *replies)
    raise TransientError(f"the chat {chat.chat_id!r} kept changing; retrying the step later")


def _log_ended(run: Run, chat: ChatRef) -> None:
    """A run that ended failed, expired or incomplete is a failure its producer meets: a
    warning that says why (the run's error, already redacted). A completed or cancelled run
    needs no line of its own (``message.completed`` / ``step.completed`` say it ended)."""
    if run.status in ("completed", "cancelled"):
        return
    log.warning(
        "run.ended",
        run_id=run.run_id,
        chat_id=chat.chat_id,
        request_id=run.request_id,
        status=run.status,
        api=run.api,
        model=run.model,
        error=run.error,
    )


async def release_chat(
    services: RunServices, store: ChatStore, chat: ChatRef, state: ChatState, run_id: str
) -> tuple[Send, ...]:
    """The chat's active run ``run_id`` has no row any more (a reset or delete that failed
    half-way removed it): the chat must not wait for it. Its next queued run starts."""
    for _ in range(MAX_CONFLICT_RETRIES):
        if state.active_run_id != run_id:
            return ()
        now = services.clock()
        nxt = await _next_run(
            services, store, chat, -1, state.total_messages, now, state.next_run_seq
        )
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
    store: ChatStore,
    chat: ChatRef,
    after_seq: int,
    last_index: int,
    now: datetime,
    state_next_seq: int,
) -> NextRun:
    """Start the first run queued after ``after_seq``: its user message is appended now (after
    message ``last_index``), so the history reads User, tool rounds, Assistant, User..."""
    if after_seq >= 0 and state_next_seq <= after_seq + 1:
        return NextRun()  # no post came after this run: nothing can be queued behind it
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
        decision=message.decision,
    )


def _transition_sends(
    services: RunServices, chat: ChatRef, run: Run, transition: Transition, *, in_process: bool
) -> list[Send]:
    sends = []
    if transition.next_step_delay is not None and not run.finished:
        delay = transition.next_step_delay
        sends.append(step_send(services, chat, run, delay, in_process=in_process))
    encoding = services.settings.message_encoding
    if transition.announce_tool_calls and run.reply_to:
        sends.append(tool_calls_required(chat, run, run.reply_to, encoding))
    if transition.announce_approvals and run.reply_to:
        sends.append(tool_approval_required(chat, run, run.reply_to, encoding))
    return sends


async def lost_follow_ups(
    services: RunServices,
    store: ChatStore,
    chat: ChatRef,
    run: Run,
    state: ChatState,
    *,
    in_process: bool = False,
) -> tuple[Send, ...]:
    """What the step that brought ``run`` to its current state had to send, sent again
    (``state``: the chat as read after it).

    For the redelivery of a message that carried the run (it stored a transition, then
    failed to send, or its worker died): the run's watchdog, and the next step or the
    toolCallsRequired and toolApprovalRequired events; or the reply of a finished run, and the watchdog (and, at step
    0, the first step) of the run its end started. Each is idempotent for its consumer (a
    step acts once, a watchdog of a finished run does nothing, replies and events carry the
    run id), and the watchdog is re-sent on every such redelivery: one that was lost would
    leave the run active for ever (SPEC §5).
    """
    active = state.active_run_id
    if not run.finished:
        if active != run.run_id:
            return ()
        watchdog = deadline_send(services, chat, run)
        if run.phase == "external":
            encoding = services.settings.message_encoding
            return (watchdog, *waiting_events(chat, run, encoding))
        return (watchdog, step_send(services, chat, run, in_process=in_process))
    sends = await replies_of(services, store, chat, run, state)
    if active and active != run.run_id:
        started = await store.load_run(chat.chat_id, active)
        if started is not None and started.seq > run.seq and not started.finished:
            sends.append(deadline_send(services, chat, started))
            if started.step == 0:
                # Its first step may never have gone out; a later one is on its way.
                sends.append(step_send(services, chat, started))
    return tuple(sends)
