"""``assistantDelete``: remove a chat's rows; its active and queued runs end ``cancelled``."""

from handlers.runs import RunServices, cancelled_replies
from schemas import AssistantDelete
from worker.handling import HandlerResult, MessageContext
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
        # Read before the rows go: the producers waiting on these runs are told they ended.
        replies = await cancelled_replies(store, request.id, "the assistant was deleted")
        applied = AppliedRequest(context.request_id, request.type, context.message_id, now)
        deleted = await store.delete_chat(request.id, applied)
        if deleted is None:
            return HandlerResult(note="duplicate")
        return HandlerResult(note="deleted", effects=replies, log_fields={"rows_deleted": deleted})
