"""Resetting and deleting a chat: every row but the applied-request records, in batches.

The extension's create resets an existing chat; a delete removes it. Both can span several
table transactions (100 operations each), and other workers may write to the chat meanwhile
(a post arriving). Rules:
- every delete is guarded by the row's ETag, and the last batch also writes the final rows
  (the new ``state`` row under its ETag, the first message, the request's applied record), so
  a change meanwhile fails that transaction and the pass starts over on a fresh listing;
- the ``state`` row is deleted last (delete) or replaced in the last batch (reset): the chat
  never looks missing while it is being reset;
- applied-request records (``req-``) survive, so that a replay of an old request is still
  recognised; they are not even listed (they grow with every request ever applied): the
  request's own record is found by a create of it failing, or by a point read;
- the runs that went are returned, read after the listing of the pass that deleted them, so
  that the producers waiting on any of them, a post that arrived mid-way included, are told;
- a create first tries to make a new chat in one transaction and no read: the applied
  record, the ``state`` row and the first message, each created only if absent. If one exists
  (409) nothing was written: the record (the first operation) means a redelivery, confirmed by
  a point read; a later one means a chat to reset, whose record did not exist, and the path
  above goes on without the point read. A chat without a ``state`` row holds no messages or
  runs (a delete removes the state row last; messages and runs are written under its ETag),
  at most rows a step of a deleted chat's run wrote unguarded afterwards (tool results,
  claims), keyed by that run's unique id, which the next reset or delete lists and removes.
"""

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from azure.core import MatchConditions
from azure.data.tables import TableTransactionError, UpdateMode

from worker.loop.errors import TransientError
from worker.runs.model import Run
from worker.store.layout import (
    MESSAGE_PREFIX,
    REQUEST_PREFIX,
    RUN_PREFIX,
    STATE_ROW,
    AppliedRecord,
    AppliedRequest,
    ChatMessage,
    ChatState,
    applied_request_entity,
    message_entity,
    message_row_key,
    state_entity,
)

# The character right after '-': keys from "req." on sort after every applied-request record.
_REQUEST_PREFIX_END = REQUEST_PREFIX[:-1] + "."
_DELETE_PASSES = 5
_MAX_OPERATIONS = 100

Rows = dict[str, str | None]


class RowStore(Protocol):
    """What a reset or delete needs of the table store (``TableChatStore``)."""

    client: Any

    def errors(self, action: str) -> AbstractAsyncContextManager[None]: ...

    async def submit(self, operations: list[Any], action: str) -> list[Mapping[str, Any]]: ...

    async def applied_record(self, chat_id: str, request_id: str) -> AppliedRecord | None: ...

    async def runs(self, chat_id: str) -> list[Run]: ...


@dataclass(frozen=True)
class Removal:
    """What a reset or delete removed: the number of rows, and the runs among them."""

    rows_deleted: int
    runs: tuple[Run, ...]


async def reset_chat(
    store: RowStore,
    state: ChatState,
    first_message: ChatMessage,
    applied: AppliedRequest,
    *,
    existed: bool = False,
) -> Removal | None:
    """Create the chat afresh: None if the request was applied already.

    A new chat is one transaction of creates, with no read (``_create_new``); a chat the
    caller knows to exist (``existed``: it has its messages in memory) skips it. Otherwise the
    old rows but the ``state`` row and the first message are deleted; then one transaction
    replaces the ``state`` row under its ETag (or creates it), writes the first message and the
    applied record, and deletes the last old rows. A crash in between leaves no record, so the
    redelivered request simply does it again.
    """
    chat_id = state.chat_id
    first_key = message_row_key(first_message.index)

    def final(rows: Rows) -> list[Any]:
        operations: list[Any] = []
        for entity in (state_entity(state), message_entity(chat_id, first_message)):
            row_key = entity["RowKey"]
            if row_key in rows:
                operations.append(("update", entity, _guarded(rows[row_key])))
            else:
                operations.append(("create", entity))
        operations.append(("create", applied_request_entity(chat_id, applied)))
        return operations

    keep = frozenset({STATE_ROW, first_key})
    if existed:
        # A chat this process has read or written: the creates would fail; list it at once.
        return await _rewrite(
            store, chat_id, applied.request_id, keep=keep, final=final, unchecked=True
        )
    failed_at = await _create_new(store, state, first_message, applied)
    if failed_at is None:
        return Removal(rows_deleted=0, runs=())
    # The record is the transaction's first row: a later one failing means it did not exist.
    # (Only a shortcut: the final transaction creates the record too, so a duplicate applied
    # meanwhile fails it, and the pass then finds the record.)
    if failed_at == 0 and await store.applied_record(chat_id, applied.request_id) is not None:
        return None
    return await _rewrite(store, chat_id, applied.request_id, keep=keep, final=final)


async def _create_new(
    store: RowStore, state: ChatState, first_message: ChatMessage, applied: AppliedRequest
) -> int | None:
    """Create the chat in one transaction if none of its rows exists (the applied record
    first, then the ``state`` row and the first message): None when it was created, else the
    index of the row that exists (409; 0 also when the service named none), nothing written."""
    chat_id = state.chat_id
    operations: list[Any] = [
        ("create", applied_request_entity(chat_id, applied)),
        ("create", state_entity(state)),
        ("create", message_entity(chat_id, first_message)),
    ]
    try:
        await _transact(store, operations, "create the chat")
    except TableTransactionError as error:
        if error.status_code == 409:
            index = error.index
            return index if isinstance(index, int) and 0 <= index < len(operations) else 0
        raise
    return None


async def _transact(store: RowStore, operations: list[Any], action: str) -> None:
    """``store.submit``: failures classify as every store call's. A retry after an answer
    lost on the way finds the record it wrote (409 at index 0): the create then reports
    itself a duplicate, which it is."""
    await store.submit(operations, action)


async def delete_chat(store: RowStore, chat_id: str, applied: AppliedRequest) -> Removal | None:
    """Delete the chat's rows; None if the request was applied already.

    The applied record goes in the same transaction as the last deletes, so a redelivered
    delete can never remove a chat that a later create rebuilt.
    """
    if await store.applied_record(chat_id, applied.request_id) is not None:
        return None
    record = applied_request_entity(chat_id, applied)
    return await _rewrite(
        store, chat_id, applied.request_id, keep=frozenset(), final=lambda _: [("create", record)]
    )


async def _rewrite(
    store: RowStore,
    chat_id: str,
    request_id: str,
    *,
    keep: frozenset[str],
    final: Callable[[Rows], list[Any]],
    unchecked: bool = False,
) -> Removal | None:
    """Delete every listed row but ``keep``, the last deletes in one transaction with
    ``final(rows)``. When another worker changed the chat meanwhile (404/409/412) the pass
    starts over on a fresh listing; if this request's own record exists by then, a duplicate
    delivery applied it meanwhile and None is returned, so that the duplicate is not undone.

    ``unchecked``: nobody looked for the request's record yet. One transaction needs no look
    (it creates the record, and fails if it exists); deletes in transactions before the last
    would not be undone, so then the record is looked for first.
    """
    for _ in range(_DELETE_PASSES):
        rows = await list_rows(store, chat_id)
        # After the listing: every run it names was created before this read (and a chat with
        # no run rows, a new one, costs no read of them).
        listed_runs = any(key.startswith(RUN_PREFIX) for key in rows)
        runs = (
            {f"{RUN_PREFIX}{run.run_id}": run for run in await store.runs(chat_id)}
            if listed_runs
            else {}
        )
        last = final(rows)
        doomed = _deletion_order(key for key in rows if key not in keep)
        batches = list(_batches(doomed, _MAX_OPERATIONS - len(last))) or [[]]
        if unchecked and len(batches) > 1:
            if await store.applied_record(chat_id, request_id) is not None:
                return None
            unchecked = False
        try:
            for number, batch in enumerate(batches, start=1):
                operations = [_delete(chat_id, row_key, rows[row_key]) for row_key in batch]
                if number == len(batches):
                    operations.extend(last)
                if operations:
                    await store.submit(operations, "rewrite the chat's rows")
        except TableTransactionError as error:
            if error.status_code not in (404, 409, 412):
                raise
            if await store.applied_record(chat_id, request_id) is not None:
                return None
            continue
        gone = tuple(runs[key] for key in doomed if key in runs)
        return Removal(rows_deleted=len(doomed), runs=gone)
    raise TransientError("the chat kept changing while its rows were being rewritten; retrying")


async def list_rows(store: RowStore, chat_id: str) -> Rows:
    """Every row key of the chat with its ETag, but the applied-request records."""
    rows: Rows = {}
    async with store.errors("list the chat's rows"):
        # One query for both sides of the req- range. The spaces inside the parentheses
        # matter: the SDK reads a parameter name up to the next space.
        entities = store.client.query_entities(
            "PartitionKey eq @pk and ( RowKey lt @before or RowKey ge @after )",
            parameters={"pk": chat_id, "before": REQUEST_PREFIX, "after": _REQUEST_PREFIX_END},
            select=["PartitionKey", "RowKey"],
        )
        async for entity in entities:
            rows[str(entity["RowKey"])] = entity.metadata.get("etag")
    return rows


def _guarded(etag: str | None) -> dict[str, Any]:
    return {
        "mode": UpdateMode.REPLACE,
        "etag": etag,
        "match_condition": MatchConditions.IfNotModified,
    }


def _delete(chat_id: str, row_key: str, etag: str | None) -> tuple[Any, ...]:
    entity = {"PartitionKey": chat_id, "RowKey": row_key}
    if etag is None:
        return ("delete", entity)
    return ("delete", entity, {"etag": etag, "match_condition": MatchConditions.IfNotModified})


def _deletion_order(keys: Iterable[str]) -> list[str]:
    """Runs, tool results and the like first, then messages from the newest, then the
    ``state`` row: until the end, a reader sees the chat with a prefix of its messages."""
    keys = list(keys)
    messages = sorted((k for k in keys if k.startswith(MESSAGE_PREFIX)), reverse=True)
    others = sorted(k for k in keys if k != STATE_ROW and not k.startswith(MESSAGE_PREFIX))
    return others + messages + [k for k in keys if k == STATE_ROW]


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
