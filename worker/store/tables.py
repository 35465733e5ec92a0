"""The chat store on Azure Table Storage.

Concurrency and idempotency rules, which every method keeps:
- the ``state`` row is only ever written with its ETag (``If-Match``) or created new, so two
  workers can never both apply a change read from the same state;
- a request's effect and the row recording that it was applied (``req-...``) are written in one
  entity-group transaction, so a redelivered request either finds its record or finds nothing
  done;
- OData filters are built with parameters, never by formatting ids into strings.
"""

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from schemas.requests import DEFAULT_STORAGE_SETTING
from worker.azure_clients import table_service
from worker.errors import PermanentError, TransientError
from worker.outcome import describe
from worker.runs.model import Run
from worker.settings import Settings
from worker.store.layout import (
    MESSAGE_PREFIX,
    MESSAGE_PREFIX_END,
    REQUEST_PREFIX,
    RUN_PREFIX,
    RUN_PREFIX_END,
    STATE_ROW,
    AppliedRequest,
    ChatMessage,
    ChatState,
    applied_request_entity,
    join_text,
    message_entity,
    message_from_entity,
    request_row_key,
    run_entity,
    run_from_entity,
    run_row_key,
    state_entity,
    state_from_entity,
    tool_result_entity,
    tool_results_prefix,
)

MAX_TRANSACTION_OPERATIONS = 100
_DELETE_PASSES = 5
# Status codes of requests the service will refuse however often they are sent.
_PERMANENT_STATUS = {400, 413}


@asynccontextmanager
async def storage_errors(action: str, where: str) -> AsyncIterator[None]:
    """Classify the table service's failures, saying where they happened.

    A refusal of the request itself (400, 413) is permanent. An unreachable service, a 5xx or
    an authentication failure is transient, re-raised naming the storage setting and table so
    that a dead letter says which connection to fix. Anything else (404, 409, 412) passes
    through for the caller to handle.
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
        if status >= 500 or status in (401, 403):
            raise TransientError(
                f"{where}: could not {action}: {describe(error)}", error_type=type(error).__name__
            ) from error
        raise
    except (ServiceRequestError, ServiceResponseError) as error:
        raise TransientError(
            f"{where}: could not {action}: {describe(error)}", error_type=type(error).__name__
        ) from error


def _retrying() -> AsyncRetrying:
    # The SDK does not retry a dropped connection on create_entity or submit_transaction
    # (see NOTES); a few quick in-process retries save a trip through the queue.
    return AsyncRetrying(
        retry=retry_if_exception_type((ServiceRequestError, ServiceResponseError)),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )


class Conflict(Exception):
    """A guarded write lost a race: re-read and decide again."""


class TableChatStore:
    """The chats of one table."""

    def __init__(self, client: TableClient, setting: str) -> None:
        self.client = client
        self.table_name: str = client.table_name
        self.where = f"table '{self.table_name}' of storage setting '{setting}'"

    def _errors(self, action: str) -> AbstractAsyncContextManager[None]:
        return storage_errors(action, self.where)

    async def load_state(self, chat_id: str) -> ChatState | None:
        """The ``state`` row with its ETag, or None when the chat does not exist."""
        try:
            async with self._errors("read the chat state"):
                entity = await self.client.get_entity(chat_id, STATE_ROW)
        except ResourceNotFoundError:
            return None
        return state_from_entity(dict(entity), entity.metadata.get("etag"))

    async def is_applied(self, chat_id: str, request_id: str) -> bool:
        """Whether the request with this id already took effect on this chat."""
        try:
            async with self._errors("read an applied-request record"):
                await self.client.get_entity(
                    chat_id, request_row_key(request_id), select=["RowKey"]
                )
        except ResourceNotFoundError:
            return False
        return True

    async def read_messages(self, chat_id: str) -> list[ChatMessage]:
        """Every ``msg-`` row of the chat, in order."""
        async with self._errors("read the chat messages"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                parameters={"pk": chat_id, "lo": MESSAGE_PREFIX, "hi": MESSAGE_PREFIX_END},
            )
            messages = [message_from_entity(dict(entity)) async for entity in entities]
        return sorted(messages, key=lambda message: message.index)

    async def load_run(self, chat_id: str, run_id: str) -> Run | None:
        """A run row with its ETag, or None (never created, or its chat was reset)."""
        try:
            async with self._errors("read a run"):
                entity = await self.client.get_entity(chat_id, run_row_key(run_id))
        except ResourceNotFoundError:
            return None
        return run_from_entity(dict(entity), entity.metadata.get("etag"))

    async def queued_runs(self, chat_id: str) -> list[Run]:
        """The chat's runs waiting for their turn, in arrival order."""
        async with self._errors("list the queued runs"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and Status eq @status",
                parameters={
                    "pk": chat_id,
                    "lo": RUN_PREFIX,
                    "hi": RUN_PREFIX_END,
                    "status": "queued",
                },
            )
            runs = [run_from_entity(dict(e), e.metadata.get("etag")) async for e in entities]
        return sorted(runs, key=lambda run: run.seq)

    async def runs(self, chat_id: str) -> list[Run]:
        """Every run of the chat, in arrival order."""
        async with self._errors("list the runs"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                parameters={"pk": chat_id, "lo": RUN_PREFIX, "hi": RUN_PREFIX_END},
            )
            runs = [run_from_entity(dict(e), e.metadata.get("etag")) async for e in entities]
        return sorted(runs, key=lambda run: run.seq)

    async def applied_run(self, chat_id: str, request_id: str) -> tuple[bool, str | None]:
        """Whether a request was applied, and the run it created if any."""
        try:
            async with self._errors("read an applied-request record"):
                entity = await self.client.get_entity(chat_id, request_row_key(request_id))
        except ResourceNotFoundError:
            return False, None
        return True, entity.get("RunId") or None

    async def save_tool_result(self, chat_id: str, run_id: str, call_id: str, output: str) -> None:
        """Keep one finished tool call's output (idempotent: the same call stores the same row)."""
        async with self._errors("store a tool result"):
            async for attempt in _retrying():
                with attempt:
                    await self.client.upsert_entity(
                        tool_result_entity(chat_id, run_id, call_id, output),
                        mode=UpdateMode.REPLACE,
                    )

    async def tool_results(self, chat_id: str, run_id: str) -> dict[str, str]:
        """The outputs of the run's tool calls that already finished, by call id."""
        prefix = tool_results_prefix(run_id)
        async with self._errors("read the tool results"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                parameters={"pk": chat_id, "lo": prefix, "hi": prefix[:-1] + "."},
            )
            return {
                str(entity["CallId"]): join_text(dict(entity), "Output")
                async for entity in entities
            }

    async def run_messages(self, chat_id: str, run_id: str) -> list[ChatMessage]:
        """The messages a run wrote (its user message, tool rounds and answer), in order."""
        async with self._errors("read a run's messages"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and RunId eq @run",
                parameters={
                    "pk": chat_id,
                    "lo": MESSAGE_PREFIX,
                    "hi": MESSAGE_PREFIX_END,
                    "run": run_id,
                },
            )
            messages = [message_from_entity(dict(entity)) async for entity in entities]
        return sorted(messages, key=lambda message: message.index)

    async def commit(
        self,
        state: ChatState,
        *,
        runs: Sequence[tuple[Run, bool]] = (),
        messages: Sequence[ChatMessage] = (),
        applied: AppliedRequest | None = None,
    ) -> None:
        """Write a change of the chat in one transaction, or not at all.

        ``state`` carries the ETag it was read with; each run is ``(run, created)``: a new run
        is created, an existing one replaced under its own ETag. Raises ``Conflict`` when any
        of them changed meanwhile (or a row to create exists), so the caller can re-read and
        decide again.
        """
        chat_id = state.chat_id
        guard = {"match_condition": MatchConditions.IfNotModified}
        operations: list[Any] = [
            (
                "update",
                state_entity(state),
                {"mode": UpdateMode.REPLACE, "etag": state.etag, **guard},
            )
        ]
        for run, created in runs:
            if created:
                operations.append(("create", run_entity(chat_id, run)))
            else:
                operations.append(
                    (
                        "update",
                        run_entity(chat_id, run),
                        {"mode": UpdateMode.REPLACE, "etag": run.etag, **guard},
                    )
                )
        operations.extend(("create", message_entity(chat_id, message)) for message in messages)
        if applied is not None:
            operations.append(("create", applied_request_entity(chat_id, applied)))
        if len(operations) > MAX_TRANSACTION_OPERATIONS:
            raise PermanentError(
                f"one step would write {len(operations)} rows; a table transaction takes at most "
                f"{MAX_TRANSACTION_OPERATIONS}",
                error_type="TooManyRows",
            )
        try:
            await self._submit(operations, "update the chat")
        except TableTransactionError as error:
            if error.status_code in (404, 409, 412):
                raise Conflict(f"the chat {chat_id!r} changed meanwhile") from error
            raise

    async def reset_chat(
        self,
        state: ChatState,
        first_message: ChatMessage,
        applied: AppliedRequest,
    ) -> bool:
        """Create the chat afresh (the extension's create semantics): False if already applied.

        Old rows are deleted first, then the new ``state``, the system message and the applied
        record are written in one transaction. A crash in between leaves no record, so the
        redelivered request simply does it again.
        """
        chat_id = state.chat_id
        key = request_row_key(applied.request_id)
        # One listing of the partition answers "already applied?" and names the rows to delete.
        rows = await self._list_rows(chat_id)
        if key in rows or await self._delete_history(chat_id, rows, guard=key) is None:
            return False
        operations: list[Any] = [
            ("create", state_entity(state)),
            ("create", message_entity(chat_id, first_message)),
            ("create", applied_request_entity(chat_id, applied)),
        ]
        try:
            await self._submit(operations, "create the chat")
        except TableTransactionError as error:
            if error.status_code != 409:
                raise
            if await self.is_applied(chat_id, applied.request_id):
                return False  # a duplicate delivery won the race
            raise TransientError(
                "the chat was written by someone else while it was being created; retrying"
            ) from error
        return True

    async def delete_chat(self, chat_id: str, applied: AppliedRequest) -> int | None:
        """Delete the chat's rows; the number deleted, or None if the request was applied.

        The applied record goes in the same transaction as the last deletes, so a redelivered
        delete can never remove a chat that a later create rebuilt.
        """
        key = request_row_key(applied.request_id)
        rows = await self._list_rows(chat_id)
        if key in rows:
            return None
        return await self._delete_history(
            chat_id, rows, guard=key, last=applied_request_entity(chat_id, applied)
        )

    async def _delete_history(
        self,
        chat_id: str,
        rows: dict[str, str | None],
        *,
        guard: str,
        last: dict[str, Any] | None = None,
    ) -> int | None:
        """Delete every row but the applied-request records; returns how many.

        Each delete is guarded by the row's ETag and a transaction fails whole. When another
        worker changed the chat meanwhile (404/409/412) the rows are listed again: if that
        listing holds ``guard`` (this request's own record), a duplicate delivery applied the
        request meanwhile and None is returned, so that the duplicate does not undo it.
        ``last`` is a row to create in the final transaction.
        """
        size = MAX_TRANSACTION_OPERATIONS - (1 if last is not None else 0)
        for _ in range(_DELETE_PASSES):
            history = list(_history(rows).items())
            batches = list(_batches(history, size)) or [[]]
            deleted = 0
            try:
                for number, batch in enumerate(batches, start=1):
                    operations: list[Any] = [
                        (
                            "delete",
                            {"PartitionKey": chat_id, "RowKey": row_key},
                            {"etag": etag, "match_condition": MatchConditions.IfNotModified},
                        )
                        for row_key, etag in batch
                    ]
                    if last is not None and number == len(batches):
                        operations.append(("create", last))
                    if operations:
                        await self._submit(operations, "delete the chat's rows")
                    deleted += len(batch)
            except TableTransactionError as error:
                if error.status_code not in (404, 409, 412):
                    raise
                rows = await self._list_rows(chat_id)
                if guard in rows:
                    return None
                continue
            return deleted
        raise TransientError("the chat kept changing while its rows were being deleted; retrying")

    async def _list_rows(self, chat_id: str) -> dict[str, str | None]:
        """Every row key of the chat with its ETag."""
        async with self._errors("list the chat's rows"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk", parameters={"pk": chat_id}, select=["PartitionKey", "RowKey"]
            )
            return {str(entity["RowKey"]): entity.metadata.get("etag") async for entity in entities}

    async def _submit(self, operations: list[Any], action: str) -> None:
        async with self._errors(action):
            async for attempt in _retrying():
                with attempt:
                    await self.client.submit_transaction(operations)


def _history(rows: dict[str, str | None]) -> dict[str, str | None]:
    """The rows a reset or delete removes: all but the applied-request records, which must
    survive so that a replay of an older request is still recognised."""
    return {key: etag for key, etag in rows.items() if not key.startswith(REQUEST_PREFIX)}


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
                        "create the table", f"table '{table}' of storage setting '{setting}'"
                    ):
                        await service.create_table(table)
                except ResourceExistsError:
                    pass
                self._stores[key] = TableChatStore(service.get_table_client(table), setting)
        return self._stores[key]

    async def close(self) -> None:
        for store in self._stores.values():
            await store.client.close()
        for service in self._services.values():
            await service.close()
        self._stores.clear()
        self._services.clear()
