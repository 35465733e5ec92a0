"""``runDeadline``: the watchdog that ends a run still active at its deadline.

Sent when a run becomes active, due just after ``WORKER_RUN_TIMEOUT``. Whatever happened to the
run's steps meanwhile (a dead-lettered or lost message, a step acknowledged as stale by
mistake, a crash, a submit that never came), a run that is still active then ends ``expired``
(its reply is sent, its open tool calls get a result, its remote work is cancelled) and the
chat's next queued post starts. A run that already ended makes this a no-op, so duplicates
are harmless.
"""

from handlers.services import ChatRef, RunServices
from handlers.transitions import StaleRun, commit_transition, deadline_send, release_chat
from schemas import RunDeadline
from worker.loop.errors import TransientError
from worker.loop.handling import HandlerResult, MessageContext
from worker.runs import machine


class DeadlineHandler:
    """Expires the run if it is still active; otherwise acknowledges."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, deadline: RunDeadline, context: MessageContext) -> HandlerResult:
        services = self._services
        chat = ChatRef(
            deadline.id, deadline.chat_storage_connection_setting, deadline.collection_name
        )
        store = await services.store(chat)
        state = await store.load_state(deadline.id)
        if state is None:
            return HandlerResult(note="the chat no longer exists")
        run = await store.load_run(deadline.id, deadline.run_id)
        fields = {"run_id": deadline.run_id}
        if run is None:
            # The row went while the chat still names it active (a reset or delete that
            # failed half-way): free the chat for its next post.
            vanished_active = state.active_run_id == deadline.run_id
            sends = await release_chat(services, store, chat, state, deadline.run_id)
            note = "the run no longer exists" + (" (its chat released)" if vanished_active else "")
            return HandlerResult(note=note, effects=sends, log_fields=fields)
        if run.finished:
            return HandlerResult(note=f"the run had ended ({run.status})", log_fields=fields)
        now = services.clock()
        if now < run.expires_at:
            # Early (clocks differ between hosts, or the run was restarted): come back then.
            return HandlerResult(
                note="not due yet", effects=(deadline_send(services, chat, run),), log_fields=fields
            )
        transition = machine.expire(run, now, services.settings.run_timeout)
        try:
            effects = await commit_transition(services, store, chat, run, transition, state=state)
        except StaleRun:
            # A step stored something at this very moment: look again.
            raise TransientError("the run changed while it was being expired") from None
        return HandlerResult(
            note="expired at its deadline",
            effects=effects,
            log_fields={**fields, "run_status": "expired", "api": run.api},
        )
