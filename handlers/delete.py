"""``assistantDelete``: remove a chat's rows; its active and queued runs end ``cancelled``."""

from handlers.replies import end_removed_runs
from handlers.services import RunServices
from schemas import AssistantDelete
from worker.loop.handling import HandlerResult, MessageContext
from worker.store.layout import AppliedRequest


class DeleteHandler:
    """Deleting a chat that does not exist succeeds: the request's intent already holds."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, request: AssistantDelete, context: MessageContext) -> HandlerResult:
        store = await self._services.stores.get(
            request.chat_storage_connection_setting, request.collection_name
        )
        now = self._services.clock()
        applied = AppliedRequest(context.request_id, request.type, context.message_id, now)
        removed = await store.delete_chat(request.id, applied)
        if removed is None:
            return HandlerResult(note="duplicate")
        # The producers waiting on the runs that went are told they ended.
        replies = await end_removed_runs(
            self._services, request.id, removed.runs, "the assistant was deleted"
        )
        return HandlerResult(
            note="deleted", effects=replies, log_fields={"rows_deleted": removed.rows_deleted}
        )
