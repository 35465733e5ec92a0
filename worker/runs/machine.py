"""The run state machine: pure transitions from (run, event) to (run, messages, next step).

Every transition that changes a run advances its ``step``: a runStep message whose step is not
the run's current one is stale (a redelivery, a duplicate) and is acknowledged without effect.
The handlers load the run, call one of these functions, persist the result with ETags, and
then send what it asks for.
"""

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from schemas.bounded import listing
from worker.runs.approvals import ApprovalPolicy
from worker.runs.model import (
    Decision,
    ModelTurn,
    Pending,
    PendingCall,
    Role,
    Run,
    RunStatus,
    StreamProgress,
    ToolCallRef,
)

CAP_MESSAGE = (
    "error: the limit of {rounds} tool rounds per run was reached; this call was not executed. "
    "Answer the user with what you have."
)


@dataclass(frozen=True)
class NewMessage:
    """A chat message a transition appends (its index is assigned when it is stored)."""

    role: Role
    content: str
    tool_calls: str = ""
    tool_call_id: str | None = None
    # The decision on the call this Tool message answers, when it needed approval (audit).
    decision: Decision | None = None


@dataclass(frozen=True)
class Transition:
    """The run after an event, the messages to append, and when to run its next step."""

    run: Run
    messages: tuple[NewMessage, ...] = ()
    # Seconds until the run's next step (``run.step``); None: no step (finished or waiting).
    next_step_delay: float | None = None
    # The run now waits for a producer's tool outputs: announce them on replyTo.
    announce_tool_calls: bool = False
    # The run now waits for decisions on calls that need approval: announce them on replyTo.
    announce_approvals: bool = False
    # The total tokens of the latest model call (the extension's TotalTokens semantics).
    last_total_tokens: int | None = None
    # Chat-level backend ids to remember (the Assistants API's assistant and thread).
    remote: dict[str, str] | None = None


def tool_calls_json(calls: Sequence[ToolCallRef]) -> str:
    """Tool calls as the extension stores them in ``ToolCalls`` (camelCase JSON)."""
    if not calls:
        return ""
    return json.dumps(
        [
            {
                "id": c.id,
                "functionName": c.name,
                "functionArguments": c.arguments,
                "kind": "Function",
            }
            for c in calls
        ],
        separators=(",", ":"),
    )


def unique_call_ids(calls: Sequence[ToolCallRef], run: Run) -> tuple[ToolCallRef, ...]:
    """The calls with an id each, unique within the turn.

    Some OpenAI-compatible servers send calls without ids, or reuse one id for several calls
    of a turn: answered by id, one output would overwrite another. Such calls get an id of
    their own (the chat backend sends the history, ids included, so any unique id works).
    """
    seen: set[str] = set()
    unique: list[ToolCallRef] = []
    for number, call in enumerate(calls):
        call_id = call.id
        if not call_id or call_id in seen:
            call_id = f"call_{run.run_id[-10:]}_{run.tool_rounds + 1}_{number}"
            while call_id in seen:
                call_id += "_"
        seen.add(call_id)
        unique.append(call if call_id == call.id else replace(call, id=call_id))
    return tuple(unique)


def _advance(run: Run, **changes: object) -> Run:
    return replace(run, step=run.step + 1, **changes)  # type: ignore[arg-type]


def _end(run: Run, status: RunStatus, now: datetime, **changes: object) -> Run:
    return replace(run, status=status, step=run.step + 1, ended_at=now, pending_calls=(), **changes)  # type: ignore[arg-type]


def start(run: Run, now: datetime, timeout: float) -> Run:
    """A queued run becomes the chat's active run; its clock starts now."""
    return replace(
        run, status="in_progress", started_at=now, expires_at=now + timedelta(seconds=timeout)
    )


# Azure delays a message at most 7 days.
MAX_DELAY = 7 * 24 * 3600 - 1.0


def until_expiry(run: Run, now: datetime) -> float:
    """Seconds until a run's deadline message is due: just after its deadline."""
    return min(max((run.expires_at - now).total_seconds(), 0.0) + 1.0, MAX_DELAY)


def on_turn(
    run: Run,
    turn: ModelTurn,
    now: datetime,
    *,
    max_rounds: int,
    external_tools: Collection[str],
    approvals: ApprovalPolicy | None = None,
) -> Transition:
    """The model answered: finish with its text, or record its tool calls for the next step
    (``approvals``: which calls wait for a decision before they run)."""
    if run.stream is not None:
        # One more model call done; its kept attempt's deltas count toward deltaCount.
        counted = StreamProgress(run.stream.calls + 1, 0, run.stream.deltas + turn.deltas)
        run = replace(run, stream=counted)
    usage = run.usage + turn.usage
    handle = {**run.handle, **turn.handle}
    tokens = turn.usage.total_tokens or None
    calls = unique_call_ids(turn.tool_calls, run)
    if not calls:
        text = turn.content or ""
        if turn.incomplete:
            error = f"the answer was cut short: {turn.incomplete}"
            ended = _end(
                run, "incomplete", now, usage=usage, content=text, handle=handle, error=error
            )
        else:
            ended = _end(run, "completed", now, usage=usage, content=text, handle=handle)
        return Transition(ended, (NewMessage("Assistant", text),), last_total_tokens=tokens)

    asked = NewMessage("Assistant", turn.content or "", tool_calls=tool_calls_json(calls))
    if run.force_final or run.tool_rounds >= max_rounds:
        # Every call still gets a result, so the stored history stays valid for the next turn.
        refused = tuple(
            NewMessage("Tool", CAP_MESSAGE.format(rounds=max_rounds), tool_call_id=c.id)
            for c in calls
        )
        if run.force_final:
            ended = _end(
                run,
                "incomplete",
                now,
                usage=usage,
                handle=handle,
                error=f"the model kept calling tools after the limit of {max_rounds} rounds",
            )
            return Transition(ended, (asked, *refused), last_total_tokens=tokens)
        capped = _advance(run, usage=usage, handle=handle, phase="model", force_final=True)
        return Transition(capped, (asked, *refused), next_step_delay=0.0, last_total_tokens=tokens)

    policy = approvals or ApprovalPolicy()
    pending = tuple(
        PendingCall(
            c.id,
            c.name,
            c.arguments,
            external=c.name in external_tools,
            approval=policy.needs(c.name),
            server=policy.server_of(c.name),
        )
        for c in calls
    )
    # A run that waits for producers gets no step: their outputs and decisions resume it, and
    # the run's deadline message ends it if they never come.
    return _settle(
        run,
        pending,
        (asked,),
        usage=usage,
        handle=handle,
        answered_calls=(),
        tool_rounds=run.tool_rounds + 1,
        poll_attempt=0,
        last_total_tokens=tokens,
    )


def runnable_calls(run: Run) -> tuple[PendingCall, ...]:
    """The calls the round's ``tools`` step runs: the local calls that may run now.

    While any call of the round still waits (for a decision or an external output), only the
    calls that need no decision run: they do not wait for the others. A call that was approved
    runs once nothing waits any more, just before the model is called again."""
    local = [c for c in run.pending_calls if not c.external and not c.undecided]
    if any(c.external or c.undecided for c in run.pending_calls):
        return tuple(c for c in local if not c.approval)
    return tuple(local)


def _settle(
    run: Run,
    pending: tuple[PendingCall, ...],
    messages: tuple[NewMessage, ...],
    *,
    announce_outputs: bool = False,
    last_total_tokens: int | None = None,
    **changes: object,
) -> Transition:
    """What the round does next with the calls still ``pending``: call the model again when
    none is left, run the local calls that may run now, or wait for producers (outputs,
    decisions). Waits are announced when the run starts waiting (``announce_outputs``: also
    when a decision made an external call wait for its output)."""
    probe = replace(run, pending_calls=pending)
    if not pending:
        resumed = _advance(run, pending_calls=(), phase="model", status="in_progress", **changes)
        return Transition(
            resumed, messages, next_step_delay=0.0, last_total_tokens=last_total_tokens
        )
    if runnable_calls(probe):
        nxt = _advance(run, pending_calls=pending, phase="tools", status="in_progress", **changes)
        return Transition(nxt, messages, next_step_delay=0.0, last_total_tokens=last_total_tokens)
    waiting = _advance(
        run, pending_calls=pending, phase="external", status="requires_action", **changes
    )
    # Announced once, when the run starts waiting; a partial submit announces nothing.
    starts = run.phase != "external"
    outputs = any(c.external and not c.undecided for c in pending)
    return Transition(
        waiting,
        messages,
        announce_tool_calls=outputs and (starts or announce_outputs),
        announce_approvals=starts and any(c.undecided for c in pending),
        last_total_tokens=last_total_tokens,
    )


def on_tool_results(run: Run, results: Sequence[tuple[str, str]], now: datetime) -> Transition:
    """Results for some pending calls (call id, output): store them, then go on or wait.

    External outputs may come one submit at a time, from several producers: the run resumes
    once every pending call has a result (and every decision was taken), and remembers which
    calls of the round are answered. A result of an approved call keeps its decision."""
    answered = {call_id for call_id, _ in results}
    calls = {call.id: call for call in run.pending_calls}
    messages = tuple(
        NewMessage(
            "Tool",
            output,
            tool_call_id=call_id,
            decision=calls[call_id].decision if call_id in calls else None,
        )
        for call_id, output in results
    )
    remaining = tuple(call for call in run.pending_calls if call.id not in answered)
    done = (*run.answered_calls, *(call_id for call_id, _ in results))
    return _settle(run, remaining, messages, answered_calls=done)


def denied_output(decision: Decision) -> str:
    """The tool result of a denied call: what the model reads instead of the tool's output."""
    return f"denied: {decision.reason or 'the call was not approved'}"


def on_decisions(run: Run, decisions: Sequence[tuple[str, Decision]], now: datetime) -> Transition:
    """Decisions on calls that wait for approval (sorted by ``sort_decisions``): each is kept
    with its call; a denied call is answered ``denied: <reason>`` at once, an approved one
    runs once nothing else waits. The run resumes when every call is decided (and every
    external output is in)."""
    given = dict(decisions)
    decided = tuple(
        replace(call, decision=given[call.id]) if call.id in given and call.undecided else call
        for call in run.pending_calls
    )
    denied = [
        c for c in decided if c.id in given and c.decision is not None and not c.decision.approve
    ]
    messages = tuple(
        NewMessage("Tool", denied_output(c.decision), tool_call_id=c.id, decision=c.decision)
        for c in denied
        if c.decision is not None
    )
    gone = {c.id for c in denied}
    pending = tuple(c for c in decided if c.id not in gone)
    return _settle(
        run,
        pending,
        messages,
        announce_outputs=any(c.external and c.id in given and given[c.id].approve for c in pending),
        answered_calls=(*run.answered_calls, *(c.id for c in denied)),
        decided_calls=(*run.decided_calls, *((i, d.approve) for i, d in decisions)),
    )


@dataclass(frozen=True)
class SortedDecisions:
    """What a producer's decisions mean for a run: the calls they decide (``fresh``), the
    ones already decided, whose first decision stands (``repeated``: call id, the standing
    decision, the one ignored), or why none can be accepted (``problem``)."""

    fresh: tuple[str, ...] = ()
    repeated: tuple[tuple[str, bool, bool], ...] = ()
    problem: str | None = None


def sort_decisions(run: Run, decisions: Sequence[tuple[str, bool]]) -> SortedDecisions:
    """Which of a producer's decisions (call id, approve) are new for this run.

    A decision for a call that was decided already, in this round or an earlier one of the
    run, is left out (another approver was first, or the submit was sent again): the first
    decision stands. Decisions for calls that do not wait for one are refused, naming them."""
    ids = [call_id for call_id, _ in decisions]
    if len(set(ids)) != len(ids):
        return SortedDecisions(problem="the same toolCallId is given more than once")
    standing = dict(run.decided_calls)
    repeated = tuple(
        (call_id, standing[call_id], approve)
        for call_id, approve in decisions
        if call_id in standing
    )
    fresh = tuple(call_id for call_id in ids if call_id not in standing)
    if not fresh:
        return SortedDecisions(repeated=repeated)
    if run.status != "requires_action":
        return SortedDecisions(
            repeated=repeated,
            problem=f"run {run.run_id!r} is not waiting for approvals (its status is {run.status})",
        )
    waiting = {call.id for call in run.pending_calls if call.undecided}
    unknown = [call_id for call_id in fresh if call_id not in waiting]
    if unknown:
        expected = ", ".join(sorted(waiting)) or "none"
        return SortedDecisions(
            repeated=repeated,
            problem=(
                f"run {run.run_id!r} has no tool call {', '.join(map(repr, unknown))} waiting "
                f"for approval (waiting for: {expected})"
            ),
        )
    return SortedDecisions(fresh=fresh, repeated=repeated)


def sort_outputs(run: Run, call_ids: Sequence[str]) -> tuple[list[str], str | None]:
    """Which of a producer's tool outputs are new for this run, or why none can be accepted.

    An output for a call of the round that already has one is left out (a second service
    answering the same call, a re-sent submit): ignored, not an error. Outputs for calls the
    run does not wait for are refused, naming them (an external call that waits for approval
    takes its output only once approved).
    """
    if len(set(call_ids)) != len(call_ids):
        return [], "the same toolCallId is given more than once"
    answered = set(run.answered_calls)
    fresh = [call_id for call_id in call_ids if call_id not in answered]
    if not fresh:
        return [], None
    if run.status != "requires_action":
        return (
            [],
            f"run {run.run_id!r} is not waiting for tool outputs (its status is {run.status})",
        )
    waiting = {call.id for call in run.pending_calls if call.external and not call.undecided}
    unknown = [call_id for call_id in fresh if call_id not in waiting]
    if unknown:
        # Cut lists: a submit may name thousands of calls.
        expected = listing(sorted(waiting), shown=20) or "none"
        undecided = {call.id for call in run.pending_calls if call.undecided}
        early = [call_id for call_id in unknown if call_id in undecided]
        first = f"; {listing(early)} must be approved first (submitToolApprovals)" if early else ""
        return [], (
            f"run {run.run_id!r} has no pending tool call {listing(unknown)} "
            f"(waiting for: {expected}){first}"
        )
    return fresh, None


def on_pending(run: Run, pending: Pending, now: datetime, schedule: Sequence[float]) -> Transition:
    """A background response or remote run is still working: poll again on the schedule."""
    handle = {**run.handle, **pending.handle}
    if pending.ended is not None:
        return Transition(_end(run, pending.ended, now, handle=handle, error=pending.error))
    delay = schedule[min(run.poll_attempt, len(schedule) - 1)] if schedule else 1.0
    polled = _advance(run, handle=handle, phase="poll", poll_attempt=run.poll_attempt + 1)
    return Transition(polled, next_step_delay=delay)


def on_transient(run: Run, delay: float, *, attempt: int | None = None) -> Transition:
    """The model service failed transiently: run the same work again after ``delay``. A
    streamed try numbered ``attempt`` failed: the next try streams under a higher one."""
    retried = _advance(run, transient_failures=run.transient_failures + 1)
    if run.stream is not None and attempt is not None:
        retried = replace(retried, stream=replace(run.stream, attempt=attempt + 1))
    return Transition(retried, next_step_delay=delay)


def _closing(run: Run, ended: str) -> tuple[NewMessage, ...]:
    """A result for every open call of a run that ends (``ended``: "failed", "expired"), so
    the stored history stays valid; a call that was decided keeps its decision."""
    return tuple(
        NewMessage(
            "Tool",
            f"error: the run {ended} while this call waited for approval; it was not run"
            if call.undecided
            else f"error: the run {ended} before this call was answered",
            tool_call_id=call.id,
            decision=call.decision,
        )
        for call in run.pending_calls
    )


def fail(run: Run, error: str, now: datetime) -> Transition:
    """The run ends ``failed`` (the model refused the request, or a step kept failing);
    open tool calls get a result, so the stored history stays valid."""
    return Transition(_end(run, "failed", now, error=error), _closing(run, "failed"))


def expire(run: Run, now: datetime, timeout: float) -> Transition:
    """The run did not finish within WORKER_RUN_TIMEOUT; open tool calls get a result (those
    that waited for a decision say so: they were never run)."""
    closing = _closing(run, "expired")
    ended = _end(run, "expired", now, error=f"the run did not finish within {timeout:g} s")
    return Transition(ended, closing)


def cancel(run: Run, now: datetime, reason: str) -> Transition:
    """The run is cancelled (its chat was deleted or reset)."""
    return Transition(_end(run, "cancelled", now, error=reason))
