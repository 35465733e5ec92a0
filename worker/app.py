"""Wiring: from ``Settings`` to a running worker. Used by the CLI, the demo and the tests."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from handlers import build_registry
from worker.azure_clients import queue_service
from worker.azure_queue import AzureQueueBroker
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


@asynccontextmanager
async def open_app(settings: Settings) -> AsyncIterator[App]:
    """Build the broker, the stores and the worker; close every client on exit."""
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    stores = ChatStores(settings)
    worker = Worker(broker, build_registry(stores), settings, redactor=Redactor(settings.secrets()))
    try:
        yield App(settings, broker, stores, worker)
    finally:
        await stores.close()
        await broker.close()
