"""The events a run sends its producer on ``replyTo``: ``assistantReply`` when it ends,
``toolCallsRequired`` when it waits for external tools, ``toolApprovalRequired`` when calls wait
for a decision, and ``cancelled`` replies for the runs a delete or reset removed. Each is cut to
fit one queue message; the chat keeps the whole text.
"""

from collections.abc import Callable, Sequence
from typing import Any

from handlers.query import to_assistant_message
from handlers.services import ChatRef, RunServices
from schemas import (
    ApprovalCall,
    AssistantReply,
    ToolApprovalRequired,
    ToolCallRequest,
    ToolCallsRequired,
    encode_body,
)
from schemas.decode import MAX_MESSAGE_BYTES, Encoding
from schemas.events import Usage as UsageEvent
from worker.loop.handling import Send
from worker.runs.model import Run
from worker.store.layout import ChatState
from worker.store.protocol import ChatStore


def tool_calls_required(chat: ChatRef, run: Run, reply_to: str, encoding: Encoding) -> Send:
    """The ``toolCallsRequired`` event of a run waiting for external tool outputs, cut to
    fit one queue message (see :func:`fit_tool_calls`)."""
    event = ToolCallsRequired(
        id=chat.chat_id,
        run_id=run.run_id,
        tool_calls=[
            ToolCallRequest(id=call.id, name=call.name, arguments=call.arguments)
            for call in run.pending_calls
            if call.external and not call.undecided
        ],
        traceparent=run.traceparent,
    )
    return Send(reply_to, fit_tool_calls(event, encoding), best_effort=True)


def tool_approval_required(chat: ChatRef, run: Run, reply_to: str, encoding: Encoding) -> Send:
    """The ``toolApprovalRequired`` event of a run whose calls wait for a decision, cut to
    fit one queue message like ``toolCallsRequired``."""
    event = ToolApprovalRequired(
        id=chat.chat_id,
        run_id=run.run_id,
        request_id=run.request_id,
        tool_calls=[
            ApprovalCall(id=call.id, name=call.name, arguments=call.arguments, server=call.server)
            for call in run.pending_calls
            if call.undecided
        ],
        traceparent=run.traceparent,
    )
    return Send(reply_to, fit_tool_calls(event, encoding), best_effort=True)


def waiting_events(chat: ChatRef, run: Run, encoding: Encoding) -> list[Send]:
    """What a run in requires_action waits for, announced on its replyTo: external outputs
    (``toolCallsRequired``) and decisions (``toolApprovalRequired``)."""
    if not run.reply_to:
        return []
    sends = []
    if any(call.external and not call.undecided for call in run.pending_calls):
        sends.append(tool_calls_required(chat, run, run.reply_to, encoding))
    if any(call.undecided for call in run.pending_calls):
        sends.append(tool_approval_required(chat, run, run.reply_to, encoding))
    return sends


async def replies_of(
    services: RunServices,
    store: ChatStore,
    chat: ChatRef,
    run: Run,
    state: ChatState,
) -> list[Send]:
    """The reply of a finished run; ``state``: the chat as read or written after its end. A
    streamed run's reply is also the last entry of its Redis stream, when streams go there."""
    to_redis = run.stream is not None and services.streams is not None and services.streams.redis
    if not run.finished or not (run.reply_to or to_redis):
        return []
    payload = await reply_payload(
        store, chat, run, services.settings.message_encoding, services.redact, state=state
    )
    if to_redis and services.streams is not None:
        await services.streams.publish_reply(chat.chat_id, run.request_id, payload)
    return [Send(run.reply_to, payload, best_effort=True)] if run.reply_to else []


async def end_removed_runs(
    services: RunServices, chat_id: str, runs: Sequence[Run], reason: str
) -> tuple[Send, ...]:
    """The runs a delete or reset removed: those that had not ended stop their remote work,
    and their producers get an ``assistantReply`` with status cancelled."""
    sends = []
    streams = services.streams
    for run in runs:
        if run.finished:
            continue
        await services.cancel_remote(run, {})
        to_redis = run.stream is not None and streams is not None and streams.redis
        if not (run.reply_to or to_redis):
            continue
        reply = AssistantReply(
            id=chat_id,
            run_id=run.run_id,
            request_id=run.request_id,
            status="cancelled",
            error=reason,
            traceparent=run.traceparent,
            delta_count=run.stream.deltas if run.stream is not None else None,
        ).to_wire()
        if to_redis and streams is not None:
            await streams.publish_reply(chat_id, run.request_id, reply)
        if run.reply_to:
            sends.append(Send(run.reply_to, reply, best_effort=True))
    return tuple(sends)


# Appended to a reply's content when the whole text does not fit one queue message.
REPLY_CUT = (
    "\n\n[truncated by assistant-worker: showing {shown:,} of {total:,} characters; "
    "the whole text is in the chat (assistant-worker state)]"
)


async def reply_payload(
    store: ChatStore,
    chat: ChatRef,
    run: Run,
    encoding: Encoding = "none",
    redact: Callable[[str], str] = lambda text: text,
    *,
    state: ChatState,
) -> dict[str, Any]:
    """The ``assistantReply`` event of a finished run, with the messages it wrote: taken from
    the chat's history as of ``state`` (which the worker usually has in memory), not found by
    a scan of the chat's rows."""
    history = await store.history(state)
    messages = [m for m in history if m.run_id == run.run_id]
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
        delta_count=run.stream.deltas if run.stream is not None else None,
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


def fit_tool_calls(
    event: ToolCallsRequired | ToolApprovalRequired, encoding: Encoding
) -> dict[str, Any]:
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
