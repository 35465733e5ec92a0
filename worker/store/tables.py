"""The chat store on Azure Table Storage.

Concurrency and idempotency rules, which every method keeps:
- the ``state`` row is only ever written with its ETag (``If-Match``) or created new, so two
  workers can never both apply a change read from the same state; it is never deleted but by
  a delete of the chat, so a chat being reset never looks missing;
- a request's effect and the row recording that it was applied (``req-...``) are written in one
  entity-group transaction, so a redelivered request either finds its record or finds nothing
  done;
- OData filters are built with parameters, never by formatting ids into strings.
"""

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError, ServiceResponseError
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from worker.errors import PermanentError, TransientError
from worker.runs.model import Run
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
    entity_payload_bytes,
    join_text,
    message_entity,
    message_from_entity,
    message_row_key,
    request_row_key,
    run_entity,
    run_from_entity,
    run_row_key,
    run_seq_bound,
    state_entity,
    state_from_entity,
    tool_result_entity,
    tool_results_prefix,
)
from worker.store.stores import ChatStores, storage_errors

__all__ = [
    "MAX_TRANSACTION_BYTES",
    "MAX_TRANSACTION_OPERATIONS",
    "ChatStores",
    "Conflict",
    "TableChatStore",
    "storage_errors",
]

# Azure's limits of one entity-group transaction: 100 operations and a 4 MiB payload. The
# estimate (``entity_payload_bytes`` plus ``_OPERATION_BYTES`` per operation) is kept under
# 3.5 MiB, which leaves room for the multipart framing it does not count exactly.
MAX_TRANSACTION_OPERATIONS = 100
MAX_TRANSACTION_BYTES = 3_670_016
_OPERATION_BYTES = 1_024
_DELETE_PASSES = 5
# Run ids carry six-digit sequence numbers; past them keys no longer sort by sequence.
_SIX_DIGITS = 999_999


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


def _guarded(etag: str | None, mode: UpdateMode = UpdateMode.REPLACE) -> dict[str, Any]:
    return {"mode": mode, "etag": etag, "match_condition": MatchConditions.IfNotModified}


def _delete(chat_id: str, row_key: str, etag: str | None = None) -> tuple[Any, ...]:
    """A delete operation: guarded by ``etag`` when given, else of whatever is there."""
    entity = {"PartitionKey": chat_id, "RowKey": row_key}
    if etag is None:
        return ("delete", entity)
    return ("delete", entity, {"etag": etag, "match_condition": MatchConditions.IfNotModified})


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

    async def next_queued_run(self, chat_id: str, after_seq: int) -> Run | None:
        """The first run waiting for its turn whose sequence number is above ``after_seq``.

        Run row keys sort by sequence number, so the query starts after the keys of
        ``after_seq`` and asks for one row: the runs that ended before are not read again.
        Past six digits keys stop sorting by number, so then the later runs are all read.
        (A run with a seven-digit number queued behind a six-digit one that still runs is
        not found: that would take a chat with nearly a million runs waiting at once.)
        """
        if after_seq < _SIX_DIGITS:
            low = run_seq_bound(after_seq)
            found = await self._queued_runs(chat_id, after_seq, low, first_only=True)
            if not found or found[0].seq <= _SIX_DIGITS:
                return found[0] if found else None
        found = await self._queued_runs(chat_id, after_seq, RUN_PREFIX, first_only=False)
        return min(found, key=lambda run: run.seq) if found else None

    async def _queued_runs(
        self, chat_id: str, after_seq: int, low: str, *, first_only: bool
    ) -> list[Run]:
        async with self._errors("find the next queued run"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
                " and Status eq @status and Seq gt @seq",
                parameters={
                    "pk": chat_id,
                    "lo": low,
                    "hi": RUN_PREFIX_END,
                    "status": "queued",
                    "seq": after_seq,
                },
                results_per_page=1 if first_only else None,
            )
            runs = []
            async for entity in entities:
                runs.append(run_from_entity(dict(entity), entity.metadata.get("etag")))
                if first_only:
                    break
        return runs

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

    async def save_tool_result(
        self, chat_id: str, run_id: str, round_number: int, call_id: str, output: str
    ) -> None:
        """Keep one finished tool call's output (idempotent: the same call stores the same
        row). An output larger than a row holds is stored cut, with a marker."""
        async with self._errors("store a tool result"):
            async for attempt in _retrying():
                with attempt:
                    await self.client.upsert_entity(
                        tool_result_entity(chat_id, run_id, round_number, call_id, output),
                        mode=UpdateMode.REPLACE,
                    )

    async def tool_results(self, chat_id: str, run_id: str, round_number: int) -> dict[str, str]:
        """The outputs of the tool calls of one round of a run that already finished, by call
        id (the rows are ``tool_result_row_key(run_id, round_number, call_id)``)."""
        prefix = tool_results_prefix(run_id, round_number)
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
        deletes: Sequence[str] = (),
    ) -> None:
        """Write a change of the chat in one transaction, or not at all.

        ``state`` carries the ETag it was read with and is merged under it (properties the
        worker does not know survive); each run is ``(run, created)``: a new run is created,
        an existing one replaced under its own ETag. ``deletes`` are row keys removed in the
        same transaction; one that is already gone is left out. Raises ``Conflict`` when any
        guarded row changed meanwhile (or a row to create exists), so the caller can re-read
        and decide again, and ``PermanentError`` (``TooLarge``) when the change would pass
        a transaction's limits (100 operations, about 3.5 MiB).
        """
        chat_id = state.chat_id
        operations: list[Any] = [
            ("update", state_entity(state), _guarded(state.etag, UpdateMode.MERGE))
        ]
        for run, created in runs:
            if created:
                operations.append(("create", run_entity(chat_id, run)))
            else:
                operations.append(("update", run_entity(chat_id, run), _guarded(run.etag)))
        operations.extend(("create", message_entity(chat_id, message)) for message in messages)
        if applied is not None:
            operations.append(("create", applied_request_entity(chat_id, applied)))
        operations.extend(_delete(chat_id, row_key) for row_key in deletes)
        _check_size(operations)
        while True:
            try:
                await self._submit(operations, "update the chat")
                return
            except TableTransactionError as error:
                index = error.index
                if (
                    error.status_code == 404
                    and 0 < index < len(operations)
                    and operations[index][0] == "delete"
                ):
                    # Every operation before it held: only this row was already gone.
                    del operations[index]
                    continue
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

        The old rows but the ``state`` row and the first message are deleted (the applied
        records stay); then one transaction replaces the ``state`` row under its ETag (or
        creates it), writes the first message and the applied record, and deletes the last
        old rows. The chat never looks missing meanwhile. A crash in between leaves no
        record, so the redelivered request simply does it again.
        """
        chat_id = state.chat_id
        key = request_row_key(applied.request_id)
        first_key = message_row_key(first_message.index)

        def final(rows: dict[str, str | None]) -> list[Any]:
            operations: list[Any] = []
            for entity in (state_entity(state), message_entity(chat_id, first_message)):
                row_key = entity["RowKey"]
                if row_key in rows:
                    operations.append(("update", entity, _guarded(rows[row_key])))
                else:
                    operations.append(("create", entity))
            operations.append(("create", applied_request_entity(chat_id, applied)))
            return operations

        # One listing of the partition answers "already applied?" and names the rows to delete.
        rows = await self._list_rows(chat_id)
        if key in rows:
            return False
        deleted = await self._rewrite(
            chat_id, rows, guard=key, keep=frozenset({STATE_ROW, first_key}), final=final
        )
        return deleted is not None

    async def delete_chat(self, chat_id: str, applied: AppliedRequest) -> int | None:
        """Delete the chat's rows; the number deleted, or None if the request was applied.

        The applied record goes in the same transaction as the last deletes, so a redelivered
        delete can never remove a chat that a later create rebuilt.
        """
        key = request_row_key(applied.request_id)
        rows = await self._list_rows(chat_id)
        if key in rows:
            return None
        record = applied_request_entity(chat_id, applied)
        return await self._rewrite(
            chat_id, rows, guard=key, keep=frozenset(), final=lambda _: [("create", record)]
        )

    async def _rewrite(
        self,
        chat_id: str,
        rows: dict[str, str | None],
        *,
        guard: str,
        keep: frozenset[str],
        final: Callable[[dict[str, str | None]], list[Any]],
    ) -> int | None:
        """Delete every row but the applied-request records and ``keep``, the last deletes in
        one transaction with ``final(rows)``; returns how many rows were deleted.

        Each write is guarded by the row's ETag and a transaction fails whole. When another
        worker changed the chat meanwhile (404/409/412) the rows are listed again and the
        pass starts over; if that listing holds ``guard`` (this request's own record), a
        duplicate delivery applied the request meanwhile and None is returned, so that the
        duplicate is not undone.
        """
        for _ in range(_DELETE_PASSES):
            last = final(rows)
            doomed = _deletion_order(k for k in _history(rows) if k not in keep)
            batches = list(_batches(doomed, MAX_TRANSACTION_OPERATIONS - len(last))) or [[]]
            deleted = 0
            try:
                for number, batch in enumerate(batches, start=1):
                    operations = [_delete(chat_id, row_key, rows[row_key]) for row_key in batch]
                    if number == len(batches):
                        operations.extend(last)
                    if operations:
                        await self._submit(operations, "rewrite the chat's rows")
                    deleted += len(batch)
            except TableTransactionError as error:
                if error.status_code not in (404, 409, 412):
                    raise
                rows = await self._list_rows(chat_id)
                if guard in rows:
                    return None
                continue
            return deleted
        raise TransientError("the chat kept changing while its rows were being rewritten; retrying")

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


def _check_size(operations: Sequence[Any]) -> None:
    """Refuse a transaction the service would refuse, saying why."""
    if len(operations) > MAX_TRANSACTION_OPERATIONS:
        raise PermanentError(
            f"one step would write {len(operations)} rows; a table transaction takes at most "
            f"{MAX_TRANSACTION_OPERATIONS}",
            error_type="TooLarge",
        )
    size = sum(_OPERATION_BYTES + entity_payload_bytes(op[1]) for op in operations)
    if size > MAX_TRANSACTION_BYTES:
        raise PermanentError(
            f"one step would write about {size / 2**20:.1f} MiB to the chat; a table "
            f"transaction takes at most {MAX_TRANSACTION_BYTES / 2**20:.1f} MiB here (4 MiB "
            "in Azure)",
            error_type="TooLarge",
        )


def _history(rows: dict[str, str | None]) -> dict[str, str | None]:
    """The rows a reset or delete removes: all but the applied-request records, which must
    survive so that a replay of an older request is still recognised."""
    return {key: etag for key, etag in rows.items() if not key.startswith(REQUEST_PREFIX)}


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
