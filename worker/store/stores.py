"""Chat stores per connection setting and table, and the classification of storage failures.

``worker.store.tables`` re-exports both names; this module imports it only when a store is
first opened, so either module can be imported first.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables.aio import TableServiceClient

from schemas.requests import DEFAULT_STORAGE_SETTING
from worker.azure_clients import table_service
from worker.errors import PermanentError, StorageUnavailable, TransientError
from worker.outcome import describe
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.store.tables import TableChatStore

# Status codes of requests the service will refuse however often they are sent.
_PERMANENT_STATUS = {400, 413}


@asynccontextmanager
async def storage_errors(action: str, where: str, setting: str) -> AsyncIterator[None]:
    """Classify the table service's failures, saying where they happened.

    A refusal of the request itself (400, 413) is permanent. An unreachable or busy service
    (no connection, 5xx, 429) is ``StorageUnavailable`` (the loop pauses when it is the
    worker's own storage); an authentication failure is transient. Both name the storage
    setting and table, so that a dead letter says which connection to fix. Anything else
    (404, 409, 412) passes through for the caller to handle.
    """
    try:
        yield
    except HttpResponseError as error:
        status = error.status_code or 0
        code = getattr(error, "error_code", None)
        if status in _PERMANENT_STATUS:
            raise PermanentError(
                f"{where}: the table service refused to {action}: {code or error.reason}",
                error_type="StorageRequestRejected",
            ) from error
        if status >= 500 or status == 429:
            raise StorageUnavailable(
                f"{where}: could not {action}: {describe(error)}",
                setting=setting,
                error_type=type(error).__name__,
            ) from error
        if status in (401, 403):
            raise TransientError(
                f"{where}: could not {action}: {describe(error)}", error_type=type(error).__name__
            ) from error
        raise
    except (ServiceRequestError, ServiceResponseError) as error:
        raise StorageUnavailable(
            f"{where}: could not {action}: {describe(error)}",
            setting=setting,
            error_type=type(error).__name__,
        ) from error


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

    async def get(self, setting: str, table: str) -> "TableChatStore":
        """The store of ``table`` on the account of ``setting``; the table is created once."""
        from worker.store.tables import TableChatStore  # here: tables imports this module

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
        for store in self._stores.values():
            await store.client.close()
        for service in self._services.values():
            await service.close()
        self._stores.clear()
        self._services.clear()
