"""``runStep``: advance a run by one step (call the model, poll it, or run tools).

A step acts only if it is the run's current one: a redelivered or duplicated step message
finds the run already advanced and is acknowledged without effect (unless it is the run's
carrier or direct predecessor and must resend what its first delivery lost). A step due at
once is taken in-process by the loop, after the step or post it follows. Transient model
failures become a delayed step (Retry-After when the service gives one) instead of a sleep.
"""

import asyncio
import contextlib
import functools
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from handlers.live import LiveOutput, started_handle, with_progress
from handlers.mcp_tools import NO_MCP_TOOLS, McpToolset, load_toolset, run_mcp_call
from handlers.services import ChatRef, RunServices
from handlers.tool_calls import ToolCall, ToolResult, run_tool_calls
from handlers.tools import ToolRegistry
from handlers.transitions import StaleRun, commit_transition, deadline_send, lost_follow_ups
from schemas import RunStep
from worker.backends.base import Backend, ModelError, TurnRequest
from worker.loop.errors import PermanentError, TransientError, describe
from worker.loop.handling import HandlerResult, MessageContext, Send
from worker.loop.outcome import RetryPolicy, backoff
from worker.runs import machine
from worker.runs.approvals import ApprovalPolicy
from worker.runs.history import ModelMessage, prepare_for_model, token_budget
from worker.runs.machine import Transition
from worker.runs.model import ModelTurn, Pending, PendingCall, Run, ToolCallRef
from worker.store.claims import (
    Busy,
    Claimed,
    ClaimResult,
    Done,
    NewClaim,
    Superseded,
    model_claim_row_key,
)
from worker.store.layout import (
    MAX_TEXT_UNITS_PER_ROW,
    MIN_TEXT_UNITS,
    ChatMessage,
    ChatState,
    cap_text,
    tool_result_row_key,
)
from worker.store.protocol import ChatStore
from worker.store.tables import MAX_TRANSACTION_BYTES, MAX_TRANSACTION_OPERATIONS
from worker.streaming.writer import DeltaWriter

log = structlog.get_logger("worker.runs")

MAX_TOOL_ROUNDS = 10
TOOL_TIMEOUT = 30.0
# Seconds a step waits in-process for work claimed by another copy of it (its result, or the
# claim's expiry when that copy died) before it retries through the queue.
CLAIM_PATIENCE = 30.0

# Histories up to this many messages are shaped on the event loop (see ``_request``).
INLINE_HISTORY = 64
INLINE_CHARS = 200_000
# History sent to the model: this share of the model's context window.
CONTEXT_SHARE = 0.75
# Transient model failures back off from 1 s to 60 s when the service gives no Retry-After.
MODEL_RETRY = RetryPolicy(max_dequeue_count=1_000_000, base_delay=1.0, max_delay=60.0)

# The result of a call whose worker died while running it, unless its tool is idempotent: it
# may have taken effect, so it is not run a second time.
INTERRUPTED = (
    "error: the call to {name} was interrupted (the worker running it stopped) and was not "
    "run again, so that it does not run twice; it may or may not have taken effect"
)
# Outputs kept in memory while their result rows cannot be written (see ``_finished``).
MAX_UNSTORED = 10_000
# Backends whose model call starts work that goes on remotely (claimed before it starts).
REMOTE_BACKENDS = frozenset({"responses", "assistants"})
# Handle keys that live as long as the chat, not the run (the Assistants API's objects).
REMOTE_KEYS = ("assistantId", "threadId")
THREAD_ID = "threadId"
ASSISTANTS = "assistants"

_ROLES = {"System": "system", "User": "user", "Assistant": "assistant", "Tool": "tool"}


def to_model_message(message: ChatMessage) -> ModelMessage:
    """A stored message as the model sees it (tool calls from the extension's JSON)."""
    calls: tuple[ToolCallRef, ...] = ()
    if message.tool_calls:
        try:
            parsed = json.loads(message.tool_calls)
        except json.JSONDecodeError:
            parsed = []
        calls = tuple(
            ToolCallRef(
                str(c.get("id")), str(c.get("functionName")), str(c.get("functionArguments") or "")
            )
            for c in parsed
            if isinstance(c, dict)
        )
    return ModelMessage(
        role=_ROLES[message.role],  # type: ignore[arg-type]
        content=message.content,
        tool_calls=calls,
        tool_call_id=message.name if message.role == "Tool" else None,
    )


def last_tool_outputs(messages: list[ModelMessage]) -> tuple[tuple[str, str], ...]:
    """The results that answer the newest assistant tool-call message, if the chat ends
    with them (a continuation for backends that keep the conversation remotely)."""
    outputs: list[tuple[str, str]] = []
    for message in reversed(messages):
        if message.role == "tool" and message.tool_call_id:
            outputs.append((message.tool_call_id, message.content))
            continue
        if message.role == "assistant" and message.tool_calls:
            return tuple(reversed(outputs))
        break
    return ()


# Bytes a round's tool results may take in its transaction (room left for the rest).
ROUND_ROOM = MAX_TRANSACTION_BYTES - 256 * 1024


def claim_rows(run: Run, *, chat_call: bool = False) -> list[str]:
    """The claim rows a step of ``run`` may have written (removed when it is stored);
    ``chat_call``: the step claimed its streamed ``chat`` call (``LiveOutput.claims_chat_call``)."""
    if run.phase == "tools":
        return [
            tool_result_row_key(run.run_id, run.tool_rounds, c.id)
            for c in machine.runnable_calls(run)
        ]
    if run.phase == "model" and (run.api in REMOTE_BACKENDS or chat_call):
        return [model_claim_row_key(run.run_id, run.step)]
    return []


def remote_changes(state: ChatState, run: Run, handle: dict[str, Any]) -> dict[str, str] | None:
    """The chat-level remote ids a model step changes: those its backend created, and, for a
    turn on another API than ``assistants``, the Assistants thread forgotten: it misses this
    turn, so the chat's next run there seeds a new thread from the table (the history is the
    worker's; a chat moves between APIs and back without losing a message)."""
    remote = {k: v for k, v in handle.items() if k in REMOTE_KEYS}
    if run.api != ASSISTANTS and state.remote.get(THREAD_ID):
        remote[THREAD_ID] = ""
    return remote or None


def acts_on(state: ChatState, run: Run, step: int, now: datetime) -> bool:
    """Whether a delivery of step ``step`` does the run's work (else it is stale, or the run
    waits for a producer's tool outputs)."""
    if run.finished or run.step != step or state.active_run_id != run.run_id:
        return False
    return not (run.phase == "external" and now < run.expires_at)


def reserved(call: PendingCall, tools: ToolRegistry) -> bool:
    """Whether the claim on ``call`` written ahead is only a reservation, marked claimed as
    the call starts: a call a person approved, of a tool that must not run twice. A worker
    that dies between the stored decision and the call then leaves it to run once, instead of
    answered "interrupted". (An idempotent tool is run again by whoever takes its claim over:
    a plain claim does.)"""
    spec = tools.get(call.name)
    return call.approval and not (spec is not None and spec.idempotent)


def claims_ahead(run: Run, tools: ToolRegistry) -> list[NewClaim]:
    """Claims on the local tool calls ``run`` is about to execute, written with the turn
    (or the decisions) that made them due (for the worker that runs them next, in-process)."""
    if run.phase != "tools" or run.finished:
        return []
    owner = uuid.uuid4().hex
    return [
        NewClaim(
            tool_result_row_key(run.run_id, run.tool_rounds, c.id),
            owner,
            {"RunId": run.run_id, "Round": run.tool_rounds, "CallId": c.id},
            reserved=reserved(c, tools),
        )
        for c in machine.runnable_calls(run)
    ]


def per_message_cap(count: int) -> int:
    """UTF-16 units each of ``count`` tool results may keep so that all of them fit one
    transaction, whatever the text (non-ASCII travels as 6-byte escapes)."""
    return max(MIN_TEXT_UNITS, min(MAX_TEXT_UNITS_PER_ROW, ROUND_ROOM // (6 * max(count, 1))))


class ToolSetup:
    """Which tools an assistant offers: registered ones by name, external definitions, and
    hosted tools, from its ``tools`` default (absent: every registered tool), and the tools
    of its ``mcpServers`` (``load`` lists them)."""

    def __init__(
        self, services: RunServices, defaults: dict[str, Any], mcp: McpToolset = NO_MCP_TOOLS
    ) -> None:
        self._services = services
        self.mcp = mcp
        entries = defaults.get("tools")
        registry = services.tools
        if entries is None:
            self.allowed = list(registry.names())
            external: list[dict[str, Any]] = []
            hosted: list[dict[str, Any]] = []
        else:
            self.allowed = [e for e in entries if isinstance(e, str)]
            external = [e for e in entries if isinstance(e, dict) and e.get("type") == "function"]
            hosted = [e for e in entries if isinstance(e, dict) and e.get("type") != "function"]
        self.external_names = {str(e["function"]["name"]) for e in external}
        self.definitions = tuple(
            [
                *registry.definitions(self.allowed),
                *({"type": "function", "function": e["function"]} for e in external),
                *mcp.definitions(taken={*self.allowed, *self.external_names}),
            ]
        )
        self.hosted = tuple(hosted)
        # Which calls wait for a person's decision, and the MCP server of each tool.
        self.approvals = ApprovalPolicy.of(defaults, registry.approval_names())

    @classmethod
    async def load(cls, services: RunServices, defaults: dict[str, Any]) -> "ToolSetup":
        """The assistant's tools, its MCP servers' listed (cached a minute per server)."""
        return cls(services, defaults, await load_toolset(services.mcp, defaults))

    async def run(self, call: ToolCall, timeout: float) -> ToolResult:  # noqa: ASYNC109
        """Run one of the model's calls: a registered tool, or a tool of an MCP server."""
        services = self._services
        if call.name not in self.allowed and self.mcp.server_of(call.name) is not None:
            return await run_mcp_call(
                services.mcp, self.mcp, call, registry=services.tools, timeout=timeout,
                redact=services.redact,
            )  # fmt: skip
        [result] = await run_tool_calls(
            services.tools, [call], allowed=self.allowed, timeout=timeout
        )
        return result

    def rerun_allowed(self, name: str) -> bool:
        """Whether a call interrupted by a crash may run again: a registered tool declared
        idempotent, or an MCP tool whose annotations say it is read-only or idempotent."""
        if name in self.allowed:
            spec = self._services.tools.get(name)
            return spec is not None and spec.idempotent
        return self.mcp.rerun_safe(name)


@dataclass(frozen=True)
class _Call(ToolCall):
    """A call of the round as the tools step runs it: ``approved`` when a person approved it;
    ``reserved`` when its claim written ahead is a reservation (see ``reserved``)."""

    approved: bool = False
    reserved: bool = False


class StepSuperseded(Exception):
    """Another copy of this step stored it while this one waited for its claimed work."""


class ModelCall:
    """One model call of a step, and its stream when the run streams (``live``)."""

    def __init__(self, live: LiveOutput | None) -> None:
        self.live = live
        self.writer: DeltaWriter | None = None
        # The attempt of a try that streamed and failed (the next one gets a higher one).
        self.attempt_failed: int | None = None

    async def streamed(
        self,
        call: Callable[[TurnRequest], Awaitable[ModelTurn | Pending]],
        request: TurnRequest,
        writer: DeltaWriter | None,
    ) -> ModelTurn | Pending:
        """``call`` (begin or poll) with ``writer`` as the request's stream; the writer stops
        flushing on the clock when the call returns (its last delta waits for ``finish``)."""
        self.writer = writer
        if writer is None:
            return await call(request)
        await writer.begin()
        try:
            result = await call(replace(request, stream=writer))
        except BaseException:
            with contextlib.suppress(Exception):
                await writer.settle()
            self.attempt_failed = writer.source.attempt
            raise
        await writer.settle()
        return result

    def with_progress(self, result: ModelTurn | Pending) -> ModelTurn | Pending:
        """The outcome of a remote call with where its stream got (in its handle)."""
        if self.writer is None or (isinstance(result, Pending) and result.ended is not None):
            return result
        return with_progress(result, self.writer)

    async def finish(self, result: ModelTurn | Pending) -> ModelTurn | Pending:
        """An answered call sends its last delta; one left to the polls keeps its progress."""
        if self.writer is None or self.live is None:
            return result
        if isinstance(result, ModelTurn):
            return await self.live.finish(self.writer, result)
        return self.with_progress(result)


class StepHandler:
    """Loads the run, performs its current step, stores the transition."""

    def __init__(self, services: RunServices) -> None:
        self._services = services
        # Outputs of tool calls this process ran whose result row could not be written yet
        # (storage went away): the step's next attempt stores them instead of running again.
        self._finished: dict[tuple[str, str], str] = {}

    async def _check_current(
        self, store: ChatStore, chat_id: str, run: Run, key: str, claim: Claimed
    ) -> None:
        """A claim won by creating its row is only worth something while the run is still at
        this step: the step's commit deletes its claim rows, so a copy of the step that comes
        after that commit would win a fresh claim on work already done and stored."""
        current = await store.load_run(chat_id, run.run_id)
        if current is None or current.step != run.step or current.commit_id != run.commit_id:
            await store.claims.release(chat_id, key, claim)
            raise StepSuperseded()

    async def __call__(self, step: RunStep, context: MessageContext) -> HandlerResult:
        services = self._services
        chat = ChatRef(step.id, step.chat_storage_connection_setting, step.collection_name)
        store = await services.store(chat)
        if context.handing_off:
            return await self._hand_off(store, step)
        state, run, held = await self._load(store, step, context)
        if state is None or run is None:
            return HandlerResult(note="stale: the run no longer exists")
        fields: dict[str, Any] = {"run_id": run.run_id, "step": run.step}
        if run.finished or run.step != step.step or state.active_run_id != run.run_id:
            return HandlerResult(
                note="stale: the run has moved on",
                effects=await self._lost_follow_up(store, chat, state, run, step, context),
                log_fields=fields,
            )
        if run.phase == "external" and services.clock() < run.expires_at:
            # The deadline step of an older version: a deadline message takes its place.
            return HandlerResult(
                note="waiting for tool outputs",
                effects=(deadline_send(services, chat, run),),
                log_fields=fields,
            )
        try:
            if context.give_up is not None:
                raise PermanentError(context.give_up, error_type="MaxDequeueCountExceeded")
            transition = await self._perform(store, chat, state, run, held, context)
        except StepSuperseded:
            return HandlerResult(note="stale: another delivery stored this step", log_fields=fields)
        except Exception as error:
            last = context.dequeue_count >= services.settings.max_dequeue_count
            if not (last or isinstance(error, PermanentError)):
                raise
            # End the run instead of dead-lettering its step, which would leave it active
            # until its deadline, and every later post of the chat queued behind it.
            reason = services.redact(f"the run failed: {describe(error)}")
            transition = machine.fail(run, reason, services.clock())
        try:
            effects = await self._commit(store, chat, state, run, transition, context)
        except StaleRun as stale:
            self._forget_finished(chat.chat_id, run)
            return HandlerResult(
                note="stale: another delivery advanced the run",
                effects=await self._after_stale(store, chat, stale, step, context),
            )
        except Exception:
            await self._keep_outputs(store, chat.chat_id, run)
            raise
        self._forget_finished(chat.chat_id, run)
        if context.dequeue_count > 1 and not context.in_process and not transition.run.finished:
            # A redelivered message that carries the run: its watchdog again (SPEC §5).
            effects = (deadline_send(services, chat, transition.run), *effects)
        if run.phase == "tools":
            # The log line of a tool step names the tools it ran.
            fields["tools"] = sorted({c.name for c in run.pending_calls if not c.external})
        if transition.run.finished:
            fields = {**fields, "run_status": transition.run.status, "api": run.api}
        return HandlerResult(
            note=f"{run.phase} -> {transition.run.status}", effects=effects, log_fields=fields
        )

    async def _hand_off(self, store: ChatStore, step: RunStep) -> HandlerResult:
        """The worker is stopping and sends this step to the queue instead of taking it: the
        claims on its tool calls, written by this process with the turn that asked for them,
        are given back (their rows deleted under the ETags of that commit), so that the
        worker that takes the step runs the calls instead of waiting for the claims to
        expire and answering them "interrupted"."""
        committed = store.committed(step.id, step.run_id)
        held = committed.claims if committed is not None else {}
        for key, etag in held.items():
            await store.claims.release(step.id, key, Claimed(etag))
        return HandlerResult(note=f"handed off ({len(held)} claim(s) given back)")

    async def _load(
        self, store: ChatStore, step: RunStep, context: MessageContext
    ) -> tuple[ChatState | None, Run | None, dict[str, str]]:
        """The chat's state, the run, and the claims this process holds on the step's work.
        A step whose previous step this process stored (in-process, or a poll it scheduled)
        starts from what that commit wrote, without reading it again, and holds the claims
        that commit created (only the step taken in-process right after it: a queued copy
        could come late). A stale copy can only cost a wasted call, never a wrong write (the
        commit's ETags refuse it) — as long as it is used only to act: a step that the copy
        says to drop is decided again on what the table says."""
        # A redelivery reads the table: something failed, and what it must resend depends on
        # what really landed.
        fresh_only = context.dequeue_count > 1 and not context.in_process
        committed = None if fresh_only else store.committed(step.id, step.run_id)
        now = self._services.clock()
        if committed is not None and acts_on(committed.state, committed.run, step.step, now):
            claims = committed.claims if context.in_process else {}
            return committed.state, committed.run, claims
        state = await store.load_state(step.id)
        return state, await store.load_run(step.id, step.run_id), {}

    async def _commit(
        self,
        store: ChatStore,
        chat: ChatRef,
        state: ChatState,
        run: Run,
        transition: Transition,
        context: MessageContext,
    ) -> tuple[Send, ...]:
        """Store the transition; the step's claim rows go in the same transaction (they have
        served their purpose once its results are stored). The message this step came with
        (or the one its in-process chain started from) becomes the run's carrier. When the
        next step runs tools here at once, their calls are claimed in the same transaction."""
        services = self._services
        carrier = context.message_id
        deletes = claim_rows(run, chat_call=LiveOutput.claims_chat_call(services, run))
        ahead = claims_ahead(transition.run, services.tools) if context.continues_here else []
        operations = len(transition.messages) + 2 * len(deletes) + len(ahead) + 4
        if operations > MAX_TRANSACTION_OPERATIONS:
            deletes, ahead = [], []  # a huge round keeps its records rather than fail to fit
        try:
            return await commit_transition(
                services, store, chat, run, transition, state=state, deletes=deletes,
                carrier=carrier, claims=ahead,
            )  # fmt: skip
        except PermanentError as error:
            # The transition cannot be stored (too large): store the run's failure instead.
            failed = machine.fail(run, f"the run failed: {error.reason}", services.clock())
            return await commit_transition(
                services, store, chat, run, failed, state=state, carrier=carrier
            )

    async def _after_stale(
        self,
        store: ChatStore,
        chat: ChatRef,
        stale: StaleRun,
        step: RunStep,
        context: MessageContext,
    ) -> tuple[Send, ...]:
        """The commit lost its race, or it landed and only its answer was lost (the service
        wrote it, the connection dropped, the retry saw a conflict). In that second case,
        recognised by this commit's id on the run, its follow-ups are sent. In the first, the
        race may have been with an earlier delivery of this same message that stored the step
        and died before sending what it had to: decided as for any stale redelivery."""
        state = await store.load_state(chat.chat_id)
        current = await store.load_run(chat.chat_id, stale.run_id)
        if state is None or current is None:
            return ()
        if current.commit_id == stale.commit_id:
            return await lost_follow_ups(self._services, store, chat, current, state)
        return await self._lost_follow_up(store, chat, state, current, step, context)

    async def _lost_follow_up(
        self,
        store: ChatStore,
        chat: ChatRef,
        state: ChatState,
        run: Run,
        step: RunStep,
        context: MessageContext,
    ) -> tuple[Send, ...]:
        """Re-send what this delivery's step had to send, when it is the run's direct
        predecessor (it stored its transition, then failed to send: the queue service failed,
        or a reply did not fit) or the run's carrier (a worker took the run's next steps
        in-process, holding this message, and died or failed before it finished). Without
        this the run would stall, or its reply or toolCallsRequired event would be lost.
        Duplicates are harmless: a step acts once, and events carry the run id."""
        # Only a redelivery of the same message can have lost its sends; a first delivery
        # is a duplicate of a step that did send them, and must not copy itself onward.
        if context.dequeue_count < 2 or context.in_process:
            return ()
        carried = bool(run.carrier) and run.carrier == context.message_id
        # A run that waits for producers gets its events again whatever this message was: its
        # worker may have died between them, and a submit or decision stored since then has
        # taken the run's carrier (the chaos soak lost a toolApprovalRequired that way).
        waiting = run.phase == "external" and state.active_run_id == run.run_id
        if step.step != run.step - 1 and not carried and not waiting:
            return ()
        return await lost_follow_ups(self._services, store, chat, run, state, in_process=True)

    async def _keep_outputs(self, store: ChatStore, chat_id: str, run: Run) -> None:
        """The round's commit failed: the outputs this process holds for it are stored in
        their claim rows (best effort), so that a worker that continues the run finds them
        instead of answering the calls "interrupted"."""
        if run.phase != "tools":
            return
        for call in machine.runnable_calls(run):
            key = tool_result_row_key(run.run_id, run.tool_rounds, call.id)
            output = self._finished.get((chat_id, key))
            if output is None:
                continue
            with contextlib.suppress(Exception):
                await store.save_tool_result(chat_id, run.run_id, run.tool_rounds, call.id, output)

    def _forget_finished(self, chat_id: str, run: Run) -> None:
        """The step is stored (or another delivery stored it): its outputs kept in memory
        for a failed commit are not needed any more."""
        for key in claim_rows(run):
            self._finished.pop((chat_id, key), None)

    async def _perform(
        self,
        store: ChatStore,
        chat: ChatRef,
        state: ChatState,
        run: Run,
        held: dict[str, str],
        context: MessageContext,
    ) -> Transition:
        """Do the run's current step (call or poll the model, or run tools): its transition."""
        now = self._services.clock()
        if now >= run.expires_at:
            return machine.expire(run, now, self._services.settings.run_timeout)
        tools = await ToolSetup.load(self._services, state.defaults)
        if run.phase == "tools":
            return await self._run_tools(store, state, run, tools, now, held)
        backend = self._services.backends.get(run.api)
        if backend is None:
            return machine.fail(run, f"unknown model API {run.api!r}", now)
        request = await self._request(store, chat, state, run, tools)
        live = LiveOutput.of(self._services, chat, run, context)
        call = ModelCall(live)
        try:
            result = await self._call_model(store, backend, request, run, now, call)
        except ModelError as error:
            delay = error.retry_after
            if error.transient and delay is None:
                delay = backoff(run.transient_failures + 1, MODEL_RETRY, jitter=random.random())
            # Once per attempt: the run's reply says only how it ended, the log says why.
            log.warning(
                "model.call_failed",
                run_id=run.run_id,
                request_id=run.request_id,
                step=run.step,
                api=run.api,
                model=run.model,
                status=error.status,
                retry_in_seconds=round(delay, 3) if delay is not None else None,
                error=self._services.redact(error.message),
            )
            if not error.transient or delay is None:
                return machine.fail(run, self._services.redact(error.message), now)
            # A try that streamed and failed: the next one streams under a higher attempt.
            return machine.on_transient(run, delay, attempt=call.attempt_failed)
        if isinstance(result, Pending):
            schedule = self._services.settings.poll_schedule(run.api)
            transition = machine.on_pending(run, result, now, schedule)
            return replace(transition, remote=remote_changes(state, run, result.handle))
        turn: ModelTurn = result
        transition = machine.on_turn(
            run, turn, now, max_rounds=MAX_TOOL_ROUNDS, external_tools=tools.external_names,
            approvals=tools.approvals,
        )  # fmt: skip
        return replace(transition, remote=remote_changes(state, run, turn.handle))

    async def _call_model(
        self,
        store: ChatStore,
        backend: Backend,
        request: TurnRequest,
        run: Run,
        now: datetime,
        call: "ModelCall",
    ) -> ModelTurn | Pending:
        """Start or poll the model. Starting remote work (a background response, a remote run)
        is claimed first: a redelivered or duplicated step must not start it twice (it would
        run, and bill, twice); a copy that finds it started follows it instead (and, when the
        call streamed, resumes its stream where the worker that died left it)."""
        live = call.live
        if run.phase != "model":
            writer = live.following(run.handle) if live is not None else None
            return await call.finish(await call.streamed(backend.poll, request, writer))
        if backend.name not in REMOTE_BACKENDS:
            if live is not None and LiveOutput.claims_chat_call(self._services, run):
                return await self._streamed_chat_call(store, backend, request, run, now, call)
            writer = live.fresh() if live is not None else None
            return await call.finish(await call.streamed(backend.begin, request, writer))
        key = model_claim_row_key(run.run_id, run.step)
        claim = await store.claims.acquire(
            request.chat_id, key, owner=uuid.uuid4().hex, value_property="Handle",
            patience=CLAIM_PATIENCE, extra={"RunId": run.run_id},
        )  # fmt: skip
        if isinstance(claim, Superseded):
            raise StepSuperseded()
        if isinstance(claim, Claimed):
            await self._check_current(store, request.chat_id, run, key, claim)
        if isinstance(claim, Done):
            started = json.loads(claim.value) if claim.value else {}
            writer = live.following(started) if live is not None else None
            polled = replace(request, handle={**request.handle, **started})
            return await call.finish(await call.streamed(backend.poll, polled, writer))
        if isinstance(claim, Busy):
            wait = max((claim.until - now).total_seconds(), 1.0)
            raise TransientError("another delivery of this step is starting the model call",
                                 retry_after=wait)  # fmt: skip
        async with store.claims.held(request.chat_id, key, claim) as progress:
            left = claim.left if claim.taken_over else None
            resumed = live.resumed(left, progress) if live is not None and left else None
            if resumed is not None and left is not None:
                # A worker died streaming this call: follow its response from its checkpoint.
                handle = {**request.handle, **started_handle(left)}
                result = await call.streamed(backend.poll, replace(request, handle=handle), resumed)
            else:
                writer = live.fresh(progress) if live is not None else None
                result = await call.streamed(backend.begin, request, writer)
        outcome = call.with_progress(result)
        if outcome.handle:
            # Stored before the call's last delta is sent: a copy that finds it sends that
            # delta again, as it was.
            await store.claims.finish(
                request.chat_id, key, value_property="Handle",
                value=json.dumps(outcome.handle), extra={"RunId": run.run_id},
            )  # fmt: skip
        return await call.finish(outcome)

    async def _streamed_chat_call(
        self,
        store: ChatStore,
        backend: Backend,
        request: TurnRequest,
        run: Run,
        now: datetime,
        call: ModelCall,
    ) -> ModelTurn | Pending:
        """A streamed ``chat`` call, claimed first: a copy of the step (a duplicated step
        message) waits for the claim instead of streaming the same call under the same attempt,
        and finds the step stored (the commit removes the claim row); a copy that comes after
        that commit finds the stored run moved on. A try that takes the claim over from a
        worker that died streaming sends under the next attempt."""
        live = call.live
        assert live is not None
        key = model_claim_row_key(run.run_id, run.step)
        claim = await store.claims.acquire(
            request.chat_id, key, owner=uuid.uuid4().hex, value_property="Handle",
            patience=CLAIM_PATIENCE, extra={"RunId": run.run_id, "Attempt": live.attempt},
        )  # fmt: skip
        if isinstance(claim, (Superseded, Done)):
            raise StepSuperseded()
        if isinstance(claim, Busy):
            wait = max((claim.until - now).total_seconds(), 1.0)
            raise TransientError("another delivery of this step is calling the model",
                                 retry_after=wait)  # fmt: skip
        if not claim.taken_over:
            # A copy that comes after the step was stored (its run a cached copy from before
            # that commit) would otherwise stream the call again.
            await self._check_current(store, request.chat_id, run, key, claim)
        attempt = live.attempt
        if claim.taken_over and claim.left is not None:
            attempt = max(attempt, int(claim.left.get("Attempt") or 0) + 1)
        async with store.claims.held(request.chat_id, key, claim) as progress:
            if attempt != live.attempt:
                await progress.save({"Attempt": attempt})
            writer = live.fresh(attempt=attempt)
            return await call.finish(await call.streamed(backend.begin, request, writer))

    async def _run_tools(
        self,
        store: ChatStore,
        state: ChatState,
        run: Run,
        tools: ToolSetup,
        now: datetime,
        held: dict[str, str],
    ) -> Transition:
        """Run the round's local calls, each claimed first, so that no call runs twice even
        when two copies of this step run at once; calls finished earlier are not run again.
        ``held``: claims this process made with the turn (then nothing is read first).

        An output is stored in its claim row as soon as it is ready while other calls of the
        round still run (a kill then loses only the unfinished ones); the last one goes
        straight into the round's transaction, unless its tool is not idempotent."""
        local = machine.runnable_calls(run)
        keys = {c.id: tool_result_row_key(run.run_id, run.tool_rounds, c.id) for c in local}
        outputs: dict[str, str] = {}
        if not all(key in held for key in keys.values()):
            outputs = await store.tool_results(state.chat_id, run.run_id, run.tool_rounds)
        owner = uuid.uuid4().hex
        busy: list[datetime] = []
        running = len([c for c in local if c.id not in outputs])

        async def execute(call: _Call) -> None:
            nonlocal running
            key = keys[call.id]
            extra = {"RunId": run.run_id, "Round": run.tool_rounds, "CallId": call.id}
            finished = self._finished.get((state.chat_id, key))
            if finished is not None:
                # Run by this process in an attempt whose result did not reach the table (a
                # storage outage): stored now, not run again.
                await store.save_tool_result(
                    state.chat_id, run.run_id, run.tool_rounds, call.id, finished
                )
                outputs[call.id] = self._finished.pop((state.chat_id, key))
                return
            claim: ClaimResult
            if key in held and call.reserved:
                # Reserved with the decision that approved the call: claimed now, as it starts.
                started = await store.claims.start(state.chat_id, key, Claimed(held[key]))
                if started is None:
                    raise StepSuperseded()
                claim = started
            elif key in held:
                claim = Claimed(held[key])  # claimed with the turn that asked for the call
            else:
                claim = await store.claims.acquire(
                    state.chat_id, key, owner=owner, value_property="Output",
                    patience=TOOL_TIMEOUT + CLAIM_PATIENCE, extra=extra,
                )  # fmt: skip
                if isinstance(claim, Superseded):
                    raise StepSuperseded()
                if isinstance(claim, Claimed):
                    await self._check_current(store, state.chat_id, run, key, claim)
            if isinstance(claim, Done):
                outputs[call.id] = claim.value
                return
            if isinstance(claim, Busy):
                busy.append(claim.until)
                return
            if claim.taken_over and not tools.rerun_allowed(call.name):
                output = INTERRUPTED.format(name=call.name)
            else:
                async with store.claims.held(state.chat_id, key, claim):
                    result = await tools.run(call, TOOL_TIMEOUT)
                output = result.output
            if len(self._finished) >= MAX_UNSTORED:
                self._finished.clear()  # bounded: only ever more than a few during an outage
            # Kept until the round is stored: a commit that fails stores it on its next try.
            self._finished[(state.chat_id, key)] = output
            running -= 1
            # Stored now, not only with the round's commit, while other calls still run (a
            # kill then loses only the unfinished ones), and always for a tool that must not
            # run twice: if the commit fails and another worker continues the run, it finds
            # the output instead of answering the call "interrupted". An approved call's is
            # stored by the commit, or when the commit fails (``_keep_outputs``): one request
            # less per approval round for the same protection (a worker killed before the
            # next write lands leaves the call started but unanswered either way).
            if running > 0 or (not tools.rerun_allowed(call.name) and not call.approved):
                await store.save_tool_result(
                    state.chat_id, run.run_id, run.tool_rounds, call.id, output
                )
            outputs[call.id] = output

        tools_registry = self._services.tools
        results = await asyncio.gather(
            *(
                execute(_Call(c.id, c.name, c.arguments, c.approval, reserved(c, tools_registry)))
                for c in local
                if c.id not in outputs
            ),
            return_exceptions=True,
        )
        # Raise only once every call has ended: none keeps running behind our back.
        for failure in results:
            if isinstance(failure, BaseException):
                raise failure
        if busy:
            wait = max((max(busy) - now).total_seconds(), 1.0)
            raise TransientError(
                f"{len(busy)} tool call(s) of this step are running in another worker",
                retry_after=wait,
            )
        # One transaction stores every result of the round: together they must fit it.
        answered = [(c.id, outputs[c.id]) for c in local]
        if sum(len(json.dumps(text)) for _, text in answered) > ROUND_ROOM:
            cap = per_message_cap(len(answered))
            answered = [(call_id, cap_text(text, cap)) for call_id, text in answered]
        return machine.on_tool_results(run, answered, now)

    async def _request(
        self, store: ChatStore, chat: ChatRef, state: ChatState, run: Run, tools: ToolSetup
    ) -> TurnRequest:
        stored = await store.history(state)
        shape = functools.partial(
            prepare_for_model,
            [to_model_message(m) for m in stored],
            token_budget(run.model, CONTEXT_SHARE),
            # Sent beside the history: they take their share of the budget.
            tools=tools.definitions,
            instructions=run.params.get("instructions"),
        )
        # Shaping a long history is CPU work: off the event loop, so leases renew on time;
        # a short one costs less than the hand-off to a thread.
        big = len(stored) > INLINE_HISTORY or sum(len(m.content) for m in stored) > INLINE_CHARS
        messages = await asyncio.to_thread(shape) if big else shape()
        params = run.params
        tool_choice = "none" if run.force_final else params.get("toolChoice")
        return TurnRequest(
            chat_id=state.chat_id,
            run_id=run.run_id,
            model=run.model,
            messages=tuple(messages),
            tools=tools.definitions,
            hosted_tools=tools.hosted,
            tool_choice=tool_choice,
            instructions=params.get("instructions"),
            temperature=params.get("temperature"),
            top_p=params.get("topP"),
            max_tokens=params.get("maxTokens"),
            reasoning_effort=params.get("reasoningEffort"),
            is_reasoning_model=bool(params.get("isReasoningModel")),
            ai_connection=params.get("aiConnectionName"),
            handle=run.handle,
            remote=state.remote,
            tool_outputs=last_tool_outputs(messages),
            user_message=run.user_message,
            collection=chat.collection,
            storage_setting=chat.storage_setting,
        )
