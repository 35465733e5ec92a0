"""Chat stores per connection setting and table: the one place a request's storage setting
and table name become a store (only allow-listed settings; a table is created only for a
create request, once).

Table names come from messages, so nothing here grows with them: the stores are kept in a
least-recently-used map of a size set by ``WORKER_CACHE_MB`` (what the chats' histories and
last commits may take is shared by all of them, in one ``ChatMemory``).
"""

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.data.tables.aio import TableServiceClient

from schemas.requests import DEFAULT_STORAGE_SETTING
from worker.config.settings import Settings
from worker.connections.clients import table_service
from worker.connections.counting import RequestObserver
from worker.loop.errors import PermanentError
from worker.store.cache import MIB, ChatMemory
from worker.store.errors import storage_errors
from worker.store.tables import TableChatStore

# What one store costs (its TableClient with its pipeline, measured with tracemalloc: ~57 KB).
STORE_BYTES = 64 * 1024
# The stores may take this share of the budget (1/16: 64 stores of the default 64 MiB), and
# the chats' memory the rest; a process keeps at least this many stores whatever the budget.
STORES_SHARE = 16
MIN_STORES = 8


def max_stores(budget_bytes: int) -> int:
    """How many stores a process keeps for a budget of ``budget_bytes``."""
    return max(MIN_STORES, budget_bytes // STORES_SHARE // STORE_BYTES)


@dataclass
class _Table:
    store: TableChatStore
    # This process created the table (or found it there): a create needs no request for it.
    created: bool = False


class ChatStores:
    """Chat stores per (connection setting, table), on one table service client per setting.

    A request may name only allowed settings (``AzureWebJobsStorage`` and those listed in
    ``WORKER_STORAGE_SETTINGS``): a producer must not make the worker use any other app
    setting as a connection string; so the service clients are as many as the settings.

    Stores are kept for the ``max_stores`` tables used last. A store evicted while a handler
    still holds it keeps working: its table client sends through its service's transport,
    which closing the table client leaves open (the SDK wraps it so), and what it remembers
    of chats is in the shared ``memory``, keyed by table, where a new store of the same table
    finds it.
    """

    def __init__(
        self,
        settings: Settings,
        service_factory: Callable[[Any], TableServiceClient] = table_service,
    ) -> None:
        self._settings = settings
        self._service_factory = service_factory
        self._services: dict[str, TableServiceClient] = {}
        budget = settings.cache_mb * MIB
        self.max_stores = max_stores(budget)
        self.memory = ChatMemory(max(0, budget - self.max_stores * STORE_BYTES))
        self._tables: OrderedDict[tuple[str, str], _Table] = OrderedDict()
        # Only while a table is being created: later creates of it wait for that one.
        self._creating: dict[tuple[str, str], asyncio.Lock] = {}

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

    async def get(self, setting: str, table: str, *, create: bool = False) -> TableChatStore:
        """The store of ``table`` on the account of ``setting``.

        Only a create (``create=True``) makes the table, once per process; any other request
        uses the table as it is, and a table that does not exist holds no chat: a post or
        submit then finds no chat (``ChatNotFound``), a delete nothing to delete. A name a
        producer made up thus creates nothing.
        """
        key = (setting, table)
        entry = self._tables.get(key)
        if entry is None:
            service = self._service(setting)
            entry = _Table(TableChatStore(service.get_table_client(table), setting, self.memory))
            self._tables[key] = entry
            await self._evict()
        else:
            self._tables.move_to_end(key)
        if create and not entry.created:
            await self._create_table(key, entry)
        return entry.store

    async def _create_table(self, key: tuple[str, str], entry: _Table) -> None:
        setting, table = key
        lock = self._creating.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if entry.created:
                    return
                service = self._service(setting)
                try:
                    async with storage_errors(
                        "create the table",
                        f"table '{table}' of storage setting '{setting}'",
                        setting,
                    ):
                        await service.create_table(table)
                except ResourceExistsError:
                    pass
                entry.created = True
        finally:
            # Those already waiting hold the lock; a later create finds the table created.
            if self._creating.get(key) is lock:
                del self._creating[key]

    async def _evict(self) -> None:
        while len(self._tables) > self.max_stores:
            _, evicted = self._tables.popitem(last=False)
            # Closes nothing a holder of the store needs (see the class's docstring).
            await evicted.store.client.close()

    def cached(self) -> int:
        """How many table stores are kept."""
        return len(self._tables)

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
        for entry in self._tables.values():
            await entry.store.client.close()
        for service in self._services.values():
            await service.close()
        self._tables.clear()
        self._services.clear()


# Table clients the query's reader keeps open at most. Each is small (the account's connection
# pool is shared), but callers choose the table names: the number must not grow with them.
READ_TABLES = 32


class ReadOnlyStores:
    """Stores of the worker's own storage account for reading chats (the query API): a table
    is never created, and a table that does not exist reads as holding no chat.

    At most ``max_tables`` table clients are kept, the least recently used closed first: the
    names come from callers (``collectionName``), so endless new names must not grow memory.
    """

    def __init__(
        self,
        settings: Settings,
        requests: RequestObserver | None = None,
        *,
        max_tables: int = READ_TABLES,
    ) -> None:
        if max_tables < 1:
            raise ValueError("max_tables must be at least 1")
        self._settings = settings
        self._requests = requests
        self.max_tables = max_tables
        self._service: TableServiceClient | None = None
        self._stores: OrderedDict[str, TableChatStore] = OrderedDict()

    @property
    def open_tables(self) -> int:
        """How many table clients are open now (at most ``max_tables``)."""
        return len(self._stores)

    async def get(self, table: str) -> TableChatStore:
        store = self._stores.get(table)
        if store is not None:
            self._stores.move_to_end(table)
            return store
        if self._service is None:
            self._service = table_service(self._settings.default_storage, self._requests)
        store = TableChatStore(
            self._service.get_table_client(table), self._settings.default_storage_setting
        )
        self._stores[table] = store
        evicted = []
        while len(self._stores) > self.max_tables:
            evicted.append(self._stores.popitem(last=False)[1])
        # Safe while another request still reads through an evicted store: a table client of
        # the service shares the service's connection pool, and closing it leaves that open.
        for old in evicted:
            await old.client.close()
        return store

    async def close(self) -> None:
        for store in self._stores.values():
            await store.client.close()
        self._stores.clear()
        if self._service is not None:
            await self._service.close()
            self._service = None
