"""``assistantCreate``: create an assistant, or reset it (the extension's semantics)."""

from collections.abc import Callable
from datetime import datetime
from typing import Any

from schemas import AssistantCreate
from worker.handling import HandlerResult, MessageContext
from worker.store.layout import AppliedRequest, ChatMessage, ChatState
from worker.store.tables import ChatStores


def assistant_defaults(request: AssistantCreate) -> dict[str, Any]:
    """The model, API, tools and sampling fields that become the assistant's defaults."""
    fields = request.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={
            "chat_model",
            "api",
            "tools",
            "temperature",
            "top_p",
            "max_tokens",
            "reasoning_effort",
        },
    )
    return dict(fields)


class CreateHandler:
    """Writes the ``state`` row and the system message; a redelivery with the same
    ``requestId`` finds its applied record and does not reset the chat again."""

    def __init__(self, stores: ChatStores, clock: Callable[[], datetime]) -> None:
        self._stores = stores
        self._clock = clock

    async def __call__(self, request: AssistantCreate, context: MessageContext) -> HandlerResult:
        store = await self._stores.get(
            request.chat_storage_connection_setting, request.collection_name
        )
        now = self._clock()
        state = ChatState(
            chat_id=request.id,
            exists=True,
            created_at=now,
            last_updated_at=now,
            total_messages=1,
            total_tokens=0,
            defaults=assistant_defaults(request),
        )
        system = ChatMessage(index=1, role="System", content=request.instructions, created_at=now)
        applied = AppliedRequest(context.request_id, request.type, context.message_id, now)
        created = await store.reset_chat(state, system, applied)
        return HandlerResult(note="created" if created else "duplicate")
