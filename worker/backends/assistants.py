"""The ``assistants``ckend (placeholder until it is written)."""

from worker.backends.base import ModelError, TurnRequest
from worker.backends.clients import ModelClients
from worker.runs.model import ModelTurn, Pending


class AssistantsBackend:
    """Not implemented yet."""

    name = "assistants"

    def __init__(self, clients: ModelClients) -> None:
        self._clients = clients

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        raise ModelError("the assistants API is not implemented yet", transient=False)

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        raise ModelError("the assistants API is not implemented yet", transient=False)
