"""Message handlers: one module per message type, wired together by ``build_registry``."""

from collections.abc import Callable
from datetime import UTC, datetime

from handlers.create import CreateHandler
from handlers.delete import DeleteHandler
from worker.handling import HandlerRegistry
from worker.store.tables import ChatStores


def build_registry(
    stores: ChatStores, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> HandlerRegistry:
    """The handlers of every message type this worker serves, per queue."""
    return HandlerRegistry(
        requests={
            "assistantCreate": CreateHandler(stores, clock),
            "assistantDelete": DeleteHandler(stores),
        },
        runs={},
    )
