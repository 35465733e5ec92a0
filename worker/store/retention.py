"""Retention: list chats by last activity, and delete idle chats whole.

Used by ``assistant-worker chats list|purge``. Reads and deletes go through one ``Pacer`` so
that a purge of a large table stays under a bound of requests per second.

A chat is purged state row first, under the ETag it was listed with: if the chat changed since
(a new post, a step of its run), the delete fails and the chat is skipped whole. Once the state
row is gone the chat no longer exists for the worker (a post for it waits for a create, then is
dead-lettered), so no writer can add to the rows being deleted. The other rows are then
deleted under their own ETags, 100 per transaction; if the chat is created again meanwhile
(a ``state`` row reappears), the purge stops there and leaves the new chat alone.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError
from azure.data.tables.aio import TableClient as TableClient

from worker.config.settings import StorageConnection
from worker.connections.clients import table_service
from worker.store.layout import STATE_ROW, utc

# Azure's limit of operations in one entity-group transaction.
MAX_BATCH = 100
_PASSES = 5
_EPOCH = datetime(1, 1, 1, tzinfo=UTC)
_STATE_FIELDS = ["PartitionKey", "RowKey", "CreatedAt", "LastUpdatedAt", "TotalMessages"]


class Pacer:
    """At most ``rate`` requests per second (None: unbounded); ``wait()`` before each one."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._next: float | None = None
        self.requests = 0

    async def wait(self) -> None:
        self.requests += 1
        if not self.rate:
            return
        now = self._clock()
        due = now if self._next is None else max(self._next, now)
        self._next = due + 1 / self.rate
        if due > now:
            await asyncio.sleep(due - now)


@dataclass(frozen=True)
class ChatSummary:
    """A chat's ``state`` row, as listed."""

    chat_id: str
    created_at: datetime
    last_updated_at: datetime
    total_messages: int
    active_run_id: str | None
    etag: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.chat_id,
            "createdAt": self.created_at.isoformat(),
            "lastUpdatedAt": self.last_updated_at.isoformat(),
            "totalMessages": self.total_messages,
            "activeRunId": self.active_run_id,
        }


def _summary(entity: Any) -> ChatSummary:
    return ChatSummary(
        chat_id=str(entity["PartitionKey"]),
        created_at=utc(entity.get("CreatedAt")) or _EPOCH,
        last_updated_at=utc(entity.get("LastUpdatedAt")) or _EPOCH,
        total_messages=int(entity.get("TotalMessages") or 0),
        active_run_id=entity.get("ActiveRunId") or None,
        etag=entity.metadata.get("etag"),
    )


async def _paged(entities: Any, pacer: Pacer) -> AsyncIterator[Any]:
    """The entities of a query, one paced request per page."""
    pages = entities.by_page()
    while True:
        await pacer.wait()
        try:
            page = await pages.__anext__()
        except StopAsyncIteration:
            return
        async for entity in page:
            yield entity


class TableNotFound(Exception):
    """The table does not exist (retention never creates one)."""


@asynccontextmanager
async def open_table(connection: StorageConnection, table: str) -> AsyncIterator[TableClient]:
    """The client of ``table`` on ``connection``'s account; the table is never created."""
    service = table_service(connection)
    try:
        async with service.get_table_client(table) as client:
            yield client
    finally:
        await service.close()


async def list_chats(client: TableClient, pacer: Pacer) -> list[ChatSummary]:
    """Every chat of the table by last activity, newest first; ``TableNotFound`` when the
    table does not exist.

    Table Storage has no index on activity: this reads every ``state`` row (a scan of the
    table that returns only those rows), then sorts.
    """
    entities = client.query_entities(
        "RowKey eq @rk",
        parameters={"rk": STATE_ROW},
        select=[*_STATE_FIELDS, "ActiveRunId"],
        results_per_page=1000,
    )
    try:
        chats = [_summary(entity) async for entity in _paged(entities, pacer)]
    except ResourceNotFoundError:
        raise TableNotFound(client.table_name) from None
    return sorted(chats, key=lambda chat: (chat.last_updated_at, chat.chat_id), reverse=True)


PurgeStatus = Literal["purged", "changed", "recreated"]


@dataclass(frozen=True)
class PurgeResult:
    """``purged``: every row deleted; ``changed``: the chat changed since it was listed and
    was left alone; ``recreated``: created again during the purge, the new chat left alone."""

    chat_id: str
    status: PurgeStatus
    rows: int


async def _rows(client: TableClient, chat_id: str, pacer: Pacer) -> dict[str, str | None]:
    entities = client.query_entities(
        "PartitionKey eq @pk",
        parameters={"pk": chat_id},
        select=["PartitionKey", "RowKey"],
        results_per_page=1000,
    )
    return {
        str(entity["RowKey"]): entity.metadata.get("etag")
        async for entity in _paged(entities, pacer)
    }


async def purge_chat(client: TableClient, chat: ChatSummary, pacer: Pacer) -> PurgeResult:
    """Delete every row of the chat (messages, runs, applied requests, tool results, state),
    state row first, under the ETag it was listed with; see the module's docstring."""
    deleted = 0
    await pacer.wait()
    try:
        await client.delete_entity(
            chat.chat_id,
            STATE_ROW,
            etag=chat.etag,
            match_condition=MatchConditions.IfNotModified,
        )
        deleted += 1
    except ResourceModifiedError:
        return PurgeResult(chat.chat_id, "changed", 0)
    except ResourceNotFoundError:
        pass  # deleted meanwhile (by a delete request or another purge): clear the rest
    # Listed again after each pass: a step that was under way may have added a row (a tool
    # result) after the listing.
    for _ in range(_PASSES):
        rows = await _rows(client, chat.chat_id, pacer)
        if STATE_ROW in rows:
            return PurgeResult(chat.chat_id, "recreated", deleted)
        if not rows:
            return PurgeResult(chat.chat_id, "purged", deleted)
        keys = sorted(rows)
        try:
            for start in range(0, len(keys), MAX_BATCH):
                batch = keys[start : start + MAX_BATCH]
                operations: list[Any] = [
                    (
                        "delete",
                        {"PartitionKey": chat.chat_id, "RowKey": key},
                        {"etag": rows[key], "match_condition": MatchConditions.IfNotModified},
                    )
                    for key in batch
                ]
                await pacer.wait()
                await client.submit_transaction(operations)
                deleted += len(batch)
        except TableTransactionError as error:
            if error.status_code not in (404, 409, 412):
                raise
            # A row changed or went meanwhile: list again.
    raise RuntimeError(f"the rows of chat {chat.chat_id!r} kept changing during the purge")
