"""Chat stores per connection setting and table: the one place a request's storage setting
and table name become a store (only allow-listed settings; each table created once)."""

import asyncio
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.data.tables.aio import TableServiceClient

from schemas.requests import DEFAULT_STORAGE_SETTING
from worker.config.settings import Settings
from worker.connections.clients import table_service
from worker.connections.counting import RequestObserver
from worker.loop.errors import PermanentError
from worker.store.errors import storage_errors
from worker.store.tables import TableChatStore

# Read-only stores kept open (one per table that webhooks named); more are built per use.
MAX_READERS = 64


class ChatStores:
    """Chat stores per (connection setting, table), with clients cached per key.

    A request may name only allowed settings (``AzureWebJobsStorage`` and those listed in
    ``WORKER_STORAGE_SETTINGS``): a producer must not make the worker use any other app
    setting as a connection string.
    """

    def __init__(
        self,
        settings: Settings,
        service_factory: Callable[[Any], TableServiceClient] = table_service,
    ) -> None:
        self._settings = settings
        self._service_factory = service_factory
        self._services: dict[str, TableServiceClient] = {}
        self._stores: dict[tuple[str, str], TableChatStore] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Stores for reading only, of tables that may not exist (never created).
        self._readers: dict[tuple[str, str], TableChatStore] = {}

    def _service(self, setting: str) -> TableServiceClient:
        connection = self._settings.storage.get(setting)
        if connection is None:
            raise PermanentError(
                f"chatStorageConnectionSetting {setting!r} is not allowed: use "
                f"{DEFAULT_STORAGE_SETTING} or a name listed in WORKER_STORAGE_SETTINGS",
                error_type="SettingNotAllowed",
            )
        if setting not in self._services:
            self._services[setting] = self._service_factory(connection)
        return self._services[setting]

    async def get(self, setting: str, table: str) -> TableChatStore:
        """The store of ``table`` on the account of ``setting``; the table is created once."""
        key = (setting, table)
        store = self._stores.get(key)
        if store is not None:
            return store
        service = self._service(setting)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._stores:
                try:
                    async with storage_errors(
                        "create the table",
                        f"table '{table}' of storage setting '{setting}'",
                        setting,
                    ):
                        await service.create_table(table)
                except ResourceExistsError:
                    pass
                self._stores[key] = TableChatStore(service.get_table_client(table), setting)
        return self._stores[key]

    def reader(self, setting: str, table: str) -> TableChatStore:
        """A store for reading a chat named by something other than a request (a provider's
        webhook): the setting must be allowed as for a request, but the table is never
        created (a table that does not exist reads as holding no chat)."""
        key = (setting, table)
        store = self._stores.get(key) or self._readers.get(key)
        if store is not None:
            return store
        store = TableChatStore(self._service(setting).get_table_client(table), setting)
        if len(self._readers) < MAX_READERS:
            self._readers[key] = store
        return store

    async def probe(self, setting: str) -> None:
        """One cheap request to the table service of ``setting``; raises if it does not
        answer (the storage gate's probe)."""
        service = self._service(setting)
        async with storage_errors(
            "probe the table service", f"storage setting '{setting}'", setting
        ):
            async for _ in service.query_tables("TableName eq @name", parameters={"name": "probe"}):
                break

    async def close(self) -> None:
        """Close every client opened."""
        for store in [*self._stores.values(), *self._readers.values()]:
            await store.client.close()
        for service in self._services.values():
            await service.close()
        self._stores.clear()
        self._readers.clear()
        self._services.clear()


class ReadOnlyStores:
    """Stores of the worker's own storage account for reading chats (the query API): a table
    is never created, and a table that does not exist reads as holding no chat."""

    def __init__(self, settings: Settings, requests: RequestObserver | None = None) -> None:
        self._settings = settings
        self._requests = requests
        self._service: TableServiceClient | None = None
        self._stores: dict[str, TableChatStore] = {}

    def get(self, table: str) -> TableChatStore:
        store = self._stores.get(table)
        if store is None:
            if self._service is None:
                self._service = table_service(self._settings.default_storage, self._requests)
            store = TableChatStore(
                self._service.get_table_client(table), self._settings.default_storage_setting
            )
            self._stores[table] = store
        return store

    async def close(self) -> None:
        for store in self._stores.values():
            await store.client.close()
        self._stores.clear()
        if self._service is not None:
            await self._service.close()
            self._service = None
