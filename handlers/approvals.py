"""``submitToolApprovals``: people (or services) decide the tool calls a run waits for.

Decisions may come from several approvers, each deciding their own calls, at the same instant:
each submit stores its decisions (with its applied-request record) under the run's ETag, and
one that lost the race reads the run again and decides on the fresh state, as partial tool
outputs do (``handlers.submit``). The first decision stored for a call stands: a later one,
the same or not, is acknowledged, ignored and logged (``approval.ignored`` when it differs,
``approval.repeated`` when it is the same). Decisions for
calls the run does not wait for, or for a run that no longer waits, are refused (the message
is dead-lettered with the reason).

When the decisions complete the round, the run goes on at once in this process, with this
message as its carrier: an approved call runs next (its claim, written with the decisions, is
only reserved when its tool must not run twice, and marked claimed as the call starts), or
the model is called. If the worker
dies in between, the message's redelivery continues the run from its stored step, and an
approved call that had not started runs then, once.
"""

import asyncio
import random

import structlog

from handlers.services import ChatRef, RunServices
from handlers.step import claims_ahead
from handlers.transitions import (
    MAX_CONFLICT_RETRIES,
    StaleRun,
    commit_transition,
    lost_follow_ups,
    step_send,
)
from schemas import SubmitToolApprovals
from worker.loop.errors import ChatNotFound, PermanentError, TransientError
from worker.loop.handling import HandlerResult, MessageContext, Send
from worker.runs import machine
from worker.runs.model import Decision, Run
from worker.store.layout import AppliedRecord, AppliedRequest, ChatState
from worker.store.protocol import ChatStore

log = structlog.get_logger("worker.approvals")


def _verdict(approve: bool) -> str:
    return "approve" if approve else "deny"


class ApprovalsHandler:
    """Stores the decisions (with the applied-request record) and resumes the run when every
    call is decided (and every external output is in)."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, submit: SubmitToolApprovals, context: MessageContext) -> HandlerResult:
        services = self._services
        chat = ChatRef(submit.id, submit.chat_storage_connection_setting, submit.collection_name)
        store = await services.store(chat)
        fields = {"run_id": submit.run_id}
        wanted = [(approval.tool_call_id, approval.approve) for approval in submit.approvals]
        for attempt in range(MAX_CONFLICT_RETRIES):
            # A first delivery's first try skips this read: its commit creates the record.
            redelivered = attempt > 0 or context.dequeue_count > 1
            if redelivered:
                record = await store.applied_record(submit.id, context.request_id)
                if record is not None:
                    effects = await self._resume(store, chat, submit, record, context)
                    return HandlerResult(note="duplicate", effects=effects, log_fields=fields)
            state, run, cached = await self._load(store, submit, fresh=redelivered)
            decided = machine.sort_decisions(run, wanted)
            if cached and (decided.problem is not None or not decided.fresh):
                # This process's copy of the run may only be used to act: what it says to
                # refuse or ignore is decided again on what the table says.
                state, run, cached = await self._load(store, submit, fresh=True)
                decided = machine.sort_decisions(run, wanted)
            if decided.problem is not None:
                if not redelivered:
                    # The same request applied before (sent twice): not a refusal.
                    record = await store.applied_record(submit.id, context.request_id)
                    if record is not None:
                        effects = await self._resume(store, chat, submit, record, context)
                        return HandlerResult(note="duplicate", effects=effects, log_fields=fields)
                raise PermanentError(decided.problem, error_type="InvalidToolApprovals")
            self._log_ignored(submit, run, decided.repeated)
            if not decided.fresh:
                note = "already decided: the first decision stands"
                return HandlerResult(note=note, log_fields=fields)
            now = services.clock()
            given = {approval.tool_call_id: approval for approval in submit.approvals}
            decisions = [
                (call_id, Decision(given[call_id].approve, now, given[call_id].reason,
                                   given[call_id].by))
                for call_id in decided.fresh
            ]  # fmt: skip
            transition = machine.on_decisions(run, decisions, now)
            applied = AppliedRequest(
                context.request_id, submit.type, context.message_id, now,
                run_id=run.run_id, step=transition.run.step,
            )  # fmt: skip
            # The approved calls run next, here: reserved now, with the decisions.
            ahead = claims_ahead(transition.run, services.tools) if context.continues_here else []
            try:
                effects = await commit_transition(
                    services, store, chat, run, transition, applied=applied, state=state,
                    carrier=context.message_id, claims=ahead,
                )  # fmt: skip
            except StaleRun as stale:
                landed = await self._landed(store, chat, stale)
                if landed is not None:
                    return HandlerResult(note="decisions stored", effects=landed, log_fields=fields)
                # Another approver (or a submit, or the deadline) changed the run first.
                await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))
                continue
            waiting = transition.run.status == "requires_action"
            note = "decisions stored; waiting for the rest" if waiting else "decisions stored"
            return HandlerResult(note=note, effects=effects, log_fields=fields)
        raise TransientError(f"run {submit.run_id!r} kept changing; retrying the decisions later")

    async def _load(
        self, store: ChatStore, submit: SubmitToolApprovals, *, fresh: bool
    ) -> tuple[ChatState, Run, bool]:
        """The chat's state and the run: as this process's last commit of the chat left them
        when that commit parked the run (usually: no read), else from the table. The bool
        says which. The copy is left in place: were the run not parked, it would belong to the
        step taken right after that commit, with the claims it holds."""
        if not fresh:
            committed = store.committed(submit.id, submit.run_id, keep=True)
            if committed is not None and committed.run.status == "requires_action":
                return committed.state, committed.run, True
        state = await store.load_state(submit.id)
        if state is None or not state.exists:
            raise ChatNotFound(
                f"assistant {submit.id!r} does not exist in table {submit.collection_name!r}: "
                "its tool approvals cannot be applied"
            )
        run = await store.load_run(submit.id, submit.run_id)
        if run is None:
            raise PermanentError(
                f"assistant {submit.id!r} has no run {submit.run_id!r} in table "
                f"{submit.collection_name!r}",
                error_type="UnknownRun",
            )
        return state, run, False

    def _log_ignored(
        self,
        submit: SubmitToolApprovals,
        run: Run,
        repeated: tuple[tuple[str, bool, bool], ...],
    ) -> None:
        """A decision for a call decided already: the first stands; this one is logged."""
        by = {approval.tool_call_id: approval.by for approval in submit.approvals}
        for call_id, standing, ignored in repeated:
            fields = {
                "run_id": run.run_id,
                "tool_call_id": call_id,
                "standing": _verdict(standing),
                "ignored": _verdict(ignored),
                "ignored_by": by.get(call_id),
                "reason": "the call was decided already; the first decision stands",
            }
            if standing != ignored:
                # Two people disagreed: worth a look.
                log.warning("approval.ignored", **fields)
            else:
                log.info("approval.repeated", **fields)

    async def _landed(
        self, store: ChatStore, chat: ChatRef, stale: StaleRun
    ) -> tuple[Send, ...] | None:
        """Our own write landed and only its answer was lost (the run carries this commit's
        id): the follow-ups it had to send. None when another writer changed the run."""
        state = await store.load_state(chat.chat_id)
        current = await store.load_run(chat.chat_id, stale.run_id)
        if state is None or current is None or current.commit_id != stale.commit_id:
            return None
        return await lost_follow_ups(self._services, store, chat, current, state, in_process=True)

    async def _resume(
        self,
        store: ChatStore,
        chat: ChatRef,
        submit: SubmitToolApprovals,
        record: AppliedRecord,
        context: MessageContext,
    ) -> tuple[Send, ...]:
        """A redelivered submit: its decisions are stored. If this message carried the run on
        (its worker died, or failed, while taking the steps that followed), the run continues
        from its stored step (an approved call that had not started runs now, once), or its
        reply is sent again; otherwise the step the decisions resumed is sent again, only
        while the run is still at it."""
        state = await store.load_state(submit.id)
        run = await store.load_run(submit.id, submit.run_id)
        if state is None or run is None:
            return ()
        if run.carrier and run.carrier == context.message_id and context.dequeue_count > 1:
            return await lost_follow_ups(self._services, store, chat, run, state, in_process=True)
        if run.finished or state.active_run_id != run.run_id:
            return ()
        if run.phase == "external" or record.step is None or run.step != record.step:
            return ()
        return (step_send(self._services, chat, run),)
