"""``assistantDelete``: remove a chat's rows (runs are cancelled with them)."""

from collections.abc import Callable
from datetime import datetime

from schemas import AssistantDelete
from worker.handling import HandlerResult, MessageContext
from worker.store.layout import AppliedRequest
from worker.store.tables import ChatStores


class DeleteHandler:
    """Deleting a chat that does not exist succeeds: the request's intent already holds."""

    def __init__(self, stores: ChatStores, clock: Callable[[], datetime]) -> None:
        self._stores = stores
        self._clock = clock

    async def __call__(self, request: AssistantDelete, context: MessageContext) -> HandlerResult:
        store = await self._stores.get(
            request.chat_storage_connection_setting, request.collection_name
        )
        applied = AppliedRequest(
            context.request_id, request.type, context.message_id, self._clock()
        )
        deleted = await store.delete_chat(request.id, applied)
        if deleted is None:
            return HandlerResult(note="duplicate")
        return HandlerResult(note="deleted", log_fields={"rows_deleted": deleted})
