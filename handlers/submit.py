"""``submitToolOutputs``: a producer answers external tool calls a run waits for.

Outputs may come from several services, one call each, at the same instant: each submit stores
its own outputs (with its applied-request record) under the run's ETag, and one that lost the
race to another submit reads the run again and applies its outputs to the fresh state. The run
resumes once every pending call has an output. A repeated output for an answered call is
ignored; outputs for calls the run does not wait for are refused.
"""

import asyncio
import random

from handlers.services import ChatRef, RunServices
from handlers.transitions import (
    MAX_CONFLICT_RETRIES,
    StaleRun,
    commit_transition,
    lost_follow_ups,
    step_send,
)
from schemas import SubmitToolOutputs
from worker.loop.errors import ChatNotFound, PermanentError, TransientError
from worker.loop.handling import HandlerResult, MessageContext, Send
from worker.runs import machine
from worker.store.layout import AppliedRecord, AppliedRequest, ChatState
from worker.store.protocol import ChatStore


class SubmitHandler:
    """Stores the outputs (with the applied-request record) and resumes the run when complete."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, submit: SubmitToolOutputs, context: MessageContext) -> HandlerResult:
        services = self._services
        chat = ChatRef(submit.id, submit.chat_storage_connection_setting, submit.collection_name)
        store = await services.store(chat)
        fields = {"run_id": submit.run_id}
        for attempt in range(MAX_CONFLICT_RETRIES):
            if context.give_up is not None:
                await self._chat_exists(store, submit)
                # Delivered too often (the crash guard), and not for want of its chat: the
                # submit is not run again.
                raise PermanentError(context.give_up, error_type="MaxDequeueCountExceeded")
            record = await store.applied_record(submit.id, context.request_id)
            if record is not None:
                effects = await self._resume(store, chat, submit, record)
                return HandlerResult(note="duplicate", effects=effects, log_fields=fields)
            state = await self._chat_exists(store, submit)
            run = await store.load_run(submit.id, submit.run_id)
            if run is None:
                raise PermanentError(
                    f"assistant {submit.id!r} has no run {submit.run_id!r} in table "
                    f"{submit.collection_name!r}",
                    error_type="UnknownRun",
                )
            given = {output.tool_call_id: output.output for output in submit.tool_outputs}
            fresh, problem = machine.sort_outputs(
                run, [o.tool_call_id for o in submit.tool_outputs]
            )
            if problem is not None:
                raise PermanentError(problem, error_type="InvalidToolOutputs")
            if not fresh:
                return HandlerResult(note="already answered", log_fields=fields)
            now = services.clock()
            transition = machine.on_tool_results(run, [(i, given[i]) for i in fresh], now)
            applied = AppliedRequest(
                context.request_id,
                submit.type,
                context.message_id,
                now,
                run_id=run.run_id,
                step=transition.run.step,
            )
            try:
                effects = await commit_transition(
                    services, store, chat, run, transition, applied=applied, state=state
                )
            except StaleRun as stale:
                landed = await self._landed(store, chat, stale)
                if landed is not None:
                    return HandlerResult(note="outputs accepted", effects=landed, log_fields=fields)
                # Another submit (or the deadline) changed the run first: decide again on it.
                await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))
                continue
            waiting = transition.run.status == "requires_action"
            note = "outputs stored; waiting for the rest" if waiting else "outputs accepted"
            return HandlerResult(note=note, effects=effects, log_fields=fields)
        raise TransientError(f"run {submit.run_id!r} kept changing; retrying the submit later")

    async def _chat_exists(self, store: ChatStore, submit: SubmitToolOutputs) -> ChatState:
        """The chat's state; ``ChatNotFound`` (retried within the create grace) without it."""
        state = await store.load_state(submit.id)
        if state is None or not state.exists:
            raise ChatNotFound(
                f"assistant {submit.id!r} does not exist in table "
                f"{submit.collection_name!r}: its tool outputs cannot be applied"
            )
        return state

    async def _landed(
        self, store: ChatStore, chat: ChatRef, stale: StaleRun
    ) -> tuple[Send, ...] | None:
        """Our own write landed and only its answer was lost (the run carries this commit's
        id): the follow-ups it had to send. None when another writer changed the run."""
        state = await store.load_state(chat.chat_id)
        current = await store.load_run(chat.chat_id, stale.run_id)
        if state is None or current is None or current.commit_id != stale.commit_id:
            return None
        return await lost_follow_ups(self._services, store, chat, current, state)

    async def _resume(
        self,
        store: ChatStore,
        chat: ChatRef,
        submit: SubmitToolOutputs,
        record: AppliedRecord,
    ) -> tuple[Send, ...]:
        """A redelivered submit: its outputs are stored, but the step that resumes the run may
        not have been sent before a failure. It is sent again only while the run is still at
        the step this submit brought it to: a run that moved on has had it."""
        state = await store.load_state(submit.id)
        run = await store.load_run(submit.id, submit.run_id)
        if state is None or run is None or run.finished or state.active_run_id != run.run_id:
            return ()
        if run.phase == "external" or record.step is None or run.step != record.step:
            return ()
        return (step_send(self._services, chat, run),)
