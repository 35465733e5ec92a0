"""``submitToolOutputs``: a producer answers the external tool calls a run waits for."""

from handlers.runs import ChatRef, RunServices, StaleRun, commit_transition, step_send
from schemas import SubmitToolOutputs
from worker.errors import PermanentError
from worker.handling import HandlerResult, MessageContext, Send
from worker.runs import machine
from worker.store.layout import AppliedRequest
from worker.store.tables import TableChatStore


class SubmitHandler:
    """Stores the outputs (with the applied-request record) and resumes the run."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, submit: SubmitToolOutputs, context: MessageContext) -> HandlerResult:
        services = self._services
        chat = ChatRef(submit.id, submit.chat_storage_connection_setting, submit.collection_name)
        store = await services.store(chat)
        applied, _ = await store.applied_run(submit.id, context.request_id)
        if applied:
            return HandlerResult(note="duplicate", effects=await self._resume(store, chat, submit))
        run = await store.load_run(submit.id, submit.run_id)
        if run is None:
            raise PermanentError(
                f"assistant {submit.id!r} has no run {submit.run_id!r} in table "
                f"{submit.collection_name!r}",
                error_type="UnknownRun",
            )
        outputs = [(output.tool_call_id, output.output) for output in submit.tool_outputs]
        problem = machine.check_outputs(run, [call_id for call_id, _ in outputs])
        if problem is not None:
            raise PermanentError(problem, error_type="InvalidToolOutputs")
        now = services.clock()
        transition = machine.on_tool_results(run, outputs, now)
        record = AppliedRequest(
            context.request_id, submit.type, context.message_id, now, run_id=run.run_id
        )
        try:
            effects = await commit_transition(
                services, store, chat, run, transition, applied=record
            )
        except StaleRun:
            # The run moved on meanwhile (expired, or the same outputs arrived twice at once):
            # read it again so that the reason says what happened.
            raise PermanentError(
                f"run {submit.run_id!r} changed while its tool outputs were being stored; "
                "it is no longer waiting for them",
                error_type="InvalidToolOutputs",
            ) from None
        return HandlerResult(
            note="outputs accepted", effects=effects, log_fields={"run_id": run.run_id}
        )

    async def _resume(
        self, store: TableChatStore, chat: ChatRef, submit: SubmitToolOutputs
    ) -> tuple[Send, ...]:
        """A redelivered submit: its outputs are stored, but the step that resumes the run
        may not have been sent before a failure. A duplicate step is harmless; a missing one
        would stall the run."""
        state = await store.load_state(submit.id)
        run = await store.load_run(submit.id, submit.run_id)
        if state is None or run is None or run.finished or state.active_run_id != run.run_id:
            return ()
        if run.phase == "external":
            return ()
        return (step_send(self._services, chat, run),)
