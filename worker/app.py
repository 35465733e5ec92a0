"""Wiring: from ``Settings`` to a running worker. Used by the CLI, the demo and the tests."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from handlers import build_registry
from handlers.runs import RunServices
from handlers.tools import ToolRegistry, load_tools
from worker.azure_clients import queue_service
from worker.azure_queue import AzureQueueBroker
from worker.backends.assistants import AssistantsBackend
from worker.backends.base import Backend
from worker.backends.chat import ChatBackend
from worker.backends.clients import ModelClients
from worker.backends.responses import ResponsesBackend
from worker.loop import Worker
from worker.redact import Redactor
from worker.settings import Settings
from worker.store.tables import ChatStores


@dataclass
class App:
    """The long-lived parts of one worker process."""

    settings: Settings
    broker: AzureQueueBroker
    stores: ChatStores
    worker: Worker


def build_backends(clients: ModelClients) -> dict[str, Backend]:
    """The three model APIs a run may use (SPEC §5.1)."""
    backends: list[Backend] = [
        ChatBackend(clients),
        ResponsesBackend(clients),
        AssistantsBackend(clients),
    ]
    return {backend.name: backend for backend in backends}


@asynccontextmanager
async def open_app(settings: Settings, tools: ToolRegistry | None = None) -> AsyncIterator[App]:
    """Build the broker, the stores, the model clients and the worker; close them on exit.

    ``tools`` defaults to the modules named in WORKER_TOOLS (a module that cannot be imported
    raises ``ToolLoadError`` here, before anything is consumed).
    """
    registry = tools if tools is not None else load_tools(settings.tool_modules)
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    stores = ChatStores(settings)
    clients = ModelClients(settings)
    services = RunServices(
        stores=stores,
        settings=settings,
        backends=build_backends(clients),
        tools=registry,
        clock=lambda: datetime.now(UTC),
    )
    worker = Worker(
        broker, build_registry(services), settings, redactor=Redactor(settings.secrets())
    )
    try:
        yield App(settings, broker, stores, worker)
    finally:
        await clients.close()
        await stores.close()
        await broker.close()
