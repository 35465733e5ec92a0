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

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from worker.loop.errors import PermanentError
from worker.runs.model import Run
from worker.store.cache import ChatMemory, Committed, CommittedCache, HistoryCache
from worker.store.claims import LIVE, Claims, NewClaim
from worker.store.errors import storage_errors, table_missing
from worker.store.layout import (
    MESSAGE_PREFIX,
    MESSAGE_PREFIX_END,
    RUN_PREFIX,
    RUN_PREFIX_END,
    STATE_ROW,
    AppliedRecord,
    AppliedRequest,
    ChatMessage,
    ChatState,
    applied_record_from_entity,
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
from worker.store.protocol import Conflict
from worker.store.removal import Removal, delete_chat, reset_chat

# Azure's limits of one entity-group transaction: 100 operations and a 4 MiB payload. The
# estimate (``entity_payload_bytes`` plus ``_OPERATION_BYTES`` per operation) is kept under
# 3.5 MiB, which leaves room for the multipart framing it does not count exactly.
MAX_TRANSACTION_OPERATIONS = 100
MAX_TRANSACTION_BYTES = 3_670_016
_OPERATION_BYTES = 1_024
_DELETE_PASSES = 5
# Run ids carry six-digit sequence numbers; past them keys no longer sort by sequence.
_SIX_DIGITS = 999_999
# Message row keys have four hex digits; past them keys no longer sort by index.
_FOUR_HEX_DIGITS = 0xFFFF


def _retrying() -> AsyncRetrying:
    # The SDK does not retry a dropped connection on create_entity or submit_transaction
    # (see NOTES); a few quick in-process retries save a trip through the queue.
    return AsyncRetrying(
        retry=retry_if_exception_type((ServiceRequestError, ServiceResponseError)),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )


def _guarded(etag: str | None, mode: UpdateMode = UpdateMode.REPLACE) -> dict[str, Any]:
    return {"mode": mode, "etag": etag, "match_condition": MatchConditions.IfNotModified}


def _delete(chat_id: str, row_key: str, etag: str | None = None) -> tuple[Any, ...]:
    """A delete operation: guarded by ``etag`` when given, else of whatever is there."""
    entity = {"PartitionKey": chat_id, "RowKey": row_key}
    if etag is None:
        return ("delete", entity)
    return ("delete", entity, {"etag": etag, "match_condition": MatchConditions.IfNotModified})


class TableChatStore:
    """The chats of one table.

    What it remembers of chats lives in ``memory``, the process's one ``ChatMemory`` (given by
    ``ChatStores``; a store made alone gets its own), keyed by the setting and table: a store
    object made again for the same table (the old one evicted from ``ChatStores``) finds it.
    """

    def __init__(self, client: TableClient, setting: str, memory: ChatMemory | None = None) -> None:
        self.client = client
        self.table_name: str = client.table_name
        self.setting = setting
        self.where = f"table '{self.table_name}' of storage setting '{setting}'"
        self.claims = Claims(client, self.where, setting)
        memory = memory if memory is not None else ChatMemory()
        # Table names are letters and digits only: the scope cannot be confused with another.
        scope = f"{setting}|{self.table_name}"
        self._history = HistoryCache(memory, scope)
        self._committed = CommittedCache(memory, scope)

    def errors(self, action: str) -> AbstractAsyncContextManager[None]:
        return storage_errors(action, self.where, self.setting)

    async def load_state(self, chat_id: str) -> ChatState | None:
        """The ``state`` row with its ETag, or None when the chat does not exist."""
        try:
            async with self.errors("read the chat state"):
                entity = await self.client.get_entity(chat_id, STATE_ROW)
        except ResourceNotFoundError:
            return None
        return state_from_entity(dict(entity), entity.metadata.get("etag"))

    async def is_applied(self, chat_id: str, request_id: str) -> bool:
        """Whether the request with this id already took effect on this chat."""
        try:
            async with self.errors("read an applied-request record"):
                await self.client.get_entity(
                    chat_id, request_row_key(request_id), select=["RowKey"]
                )
        except ResourceNotFoundError:
            return False
        return True

    async def read_messages(self, chat_id: str, upto: int | None = None) -> list[ChatMessage]:
        """Every ``msg-`` row of the chat, in order; with ``upto`` (the state's
        ``TotalMessages``) only those the chat counts: a row past it is left over from a
        commit that failed half-way, and the next commit overwrites it."""
        async with self.errors("read the chat messages"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                parameters={"pk": chat_id, "lo": MESSAGE_PREFIX, "hi": MESSAGE_PREFIX_END},
            )
            messages = [message_from_entity(dict(entity)) async for entity in entities]
        if upto is not None:
            messages = [message for message in messages if message.index <= upto]
        return sorted(messages, key=lambda message: message.index)

    async def history(self, state: ChatState) -> list[ChatMessage]:
        """The chat's messages ``1..TotalMessages`` of ``state``: those this process has seen
        from its cache, only the rest from the table (one range read, none when it has them
        all). See ``worker.store.cache``."""
        chat_id, total = state.chat_id, state.total_messages
        known = self._history.get(chat_id, state.created_at)[:total]
        if len(known) == total:
            return list(known)
        first = len(known) + 1
        if total > _FOUR_HEX_DIGITS:
            return await self.read_messages(chat_id, total)
        async with self.errors("read the chat messages"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey le @hi",
                parameters={
                    "pk": chat_id,
                    "lo": message_row_key(first),
                    "hi": message_row_key(total),
                },
            )
            fresh = sorted(
                [message_from_entity(dict(entity)) async for entity in entities],
                key=lambda message: message.index,
            )
        messages = [*known, *fresh]
        if [m.index for m in messages] != list(range(1, total + 1)):
            # Rows missing or out of place (a chat the worker did not write): read it whole,
            # as it is, and cache nothing.
            self._history.forget(chat_id)
            return await self.read_messages(chat_id, total)
        self._history.put(chat_id, state.created_at, messages)
        return messages

    def committed(self, chat_id: str, run_id: str, *, keep: bool = False) -> Committed | None:
        """The state and the run ``run_id`` as this process's last commit of the chat left
        them (once), or None. Only for the step taken right after that commit; ``keep``: left
        for it (a reader that acts only on a run waiting for producers, which no step
        follows)."""
        if keep:
            return self._committed.peek(chat_id, run_id)
        return self._committed.take(chat_id, run_id)

    async def load_run(self, chat_id: str, run_id: str) -> Run | None:
        """A run row with its ETag, or None (never created, or its chat was reset)."""
        try:
            async with self.errors("read a run"):
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
        async with self.errors("find the next queued run"):
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
        async with self.errors("list the runs"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                parameters={"pk": chat_id, "lo": RUN_PREFIX, "hi": RUN_PREFIX_END},
            )
            runs = [run_from_entity(dict(e), e.metadata.get("etag")) async for e in entities]
        return sorted(runs, key=lambda run: run.seq)

    async def applied_run(self, chat_id: str, request_id: str) -> tuple[bool, str | None]:
        """Whether a request was applied, and the run it created if any."""
        record = await self.applied_record(chat_id, request_id)
        return (record is not None, record.run_id if record is not None else None)

    async def applied_record(self, chat_id: str, request_id: str) -> AppliedRecord | None:
        """The record of a request applied to this chat, or None."""
        try:
            async with self.errors("read an applied-request record"):
                entity = await self.client.get_entity(chat_id, request_row_key(request_id))
        except ResourceNotFoundError:
            return None
        return applied_record_from_entity(entity)

    async def save_tool_result(
        self, chat_id: str, run_id: str, round_number: int, call_id: str, output: str
    ) -> None:
        """Keep one finished tool call's output (idempotent: the same call stores the same
        row). An output larger than a row holds is stored cut, with a marker."""
        async with self.errors("store a tool result"):
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
        async with self.errors("read the tool results"):
            entities = self.client.query_entities(
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                parameters={"pk": chat_id, "lo": prefix, "hi": prefix[:-1] + "."},
            )
            # A row still only claimed (or reserved) is a call running (or died running, or
            # about to run) elsewhere.
            return {
                str(entity["CallId"]): join_text(dict(entity), "Output")
                async for entity in entities
                if entity.get("State") not in LIVE
            }

    async def commit(
        self,
        state: ChatState,
        *,
        runs: Sequence[tuple[Run, bool]] = (),
        messages: Sequence[ChatMessage] = (),
        applied: AppliedRequest | None = None,
        deletes: Sequence[str] = (),
        claims: Sequence[NewClaim] = (),
    ) -> None:
        """Write a change of the chat in one transaction, or not at all.

        ``state`` carries the ETag it was read with and is merged under it (properties the
        worker does not know survive); each run is ``(run, created)``: a new run is created,
        an existing one replaced under its own ETag. ``deletes`` are row keys removed in the
        same transaction; one that is already gone is left out; ``claims`` are created in it
        (see ``NewClaim``), and with the state and runs remembered for the step that this
        process takes next (``committed``). Raises ``Conflict`` when any
        guarded row changed meanwhile (or a row to create exists), so the caller can re-read
        and decide again, and ``PermanentError`` (``TooLarge``) when the change would pass
        a transaction's limits (about 3.5 MiB).

        Messages are written insert-or-replace: the guarded ``state`` row in the same
        transaction already proves that nobody else appended since it was read, so a row past
        ``TotalMessages`` can only be left over from a write that failed half-way. More
        messages than one transaction holds (a turn with a hundred parallel tool calls) go
        first in transactions of their own, each guarded by the state row's newest ETag; the
        last one moves ``TotalMessages`` past them, so readers never see them before.
        """
        chat_id = state.chat_id
        rest: list[Any] = []
        for run, created in runs:
            if created:
                rest.append(("create", run_entity(chat_id, run)))
            else:
                rest.append(("update", run_entity(chat_id, run), _guarded(run.etag)))
        rest.extend(("create", claim.entity(chat_id)) for claim in claims)
        if applied is not None:
            rest.append(("create", applied_request_entity(chat_id, applied)))
        rest.extend(_delete(chat_id, row_key) for row_key in deletes)
        writes = [_upsert(message_entity(chat_id, message)) for message in messages]
        room = MAX_TRANSACTION_OPERATIONS - 1 - len(rest)
        early, late = (
            (writes[: len(writes) - room], writes[len(writes) - room :])
            if room < len(writes)
            else ([], writes)
        )
        etag = state.etag
        for chunk in _batches(early, MAX_TRANSACTION_OPERATIONS - 1):
            touch = ("update", _key_entity(chat_id, STATE_ROW), _guarded(etag, UpdateMode.MERGE))
            results = await self._commit_operations(chat_id, [touch, *chunk])
            etag = results[0].get("etag") if results else None
        head = ("update", state_entity(state), _guarded(etag, UpdateMode.MERGE))
        self._committed.forget(chat_id)
        results = await self._commit_operations(chat_id, [head, *late, *rest])
        self._remember(state, runs, claims, messages, results, first_run=1 + len(late))

    def _remember(
        self,
        state: ChatState,
        runs: Sequence[tuple[Run, bool]],
        claims: Sequence[NewClaim],
        messages: Sequence[ChatMessage],
        results: list[Mapping[str, Any]],
        *,
        first_run: int,
    ) -> None:
        """Keep what a commit wrote, with the ETags the service gave its rows (the results
        come in the order of the operations: state, late messages, runs, claims, ...)."""
        self._history.extend(state.chat_id, state.created_at, list(messages))
        etags = [result.get("etag") for result in results]
        known = first_run + len(runs) + len(claims)
        if len(etags) < known or not all(etags[:known]):
            return
        committed = {
            run.run_id: replace(run, etag=etags[first_run + i]) for i, (run, _) in enumerate(runs)
        }
        first_claim = first_run + len(runs)
        held = {claim.row_key: str(etags[first_claim + i]) for i, claim in enumerate(claims)}
        self._committed.put(replace(state, etag=etags[0]), committed, held)

    async def _commit_operations(
        self, chat_id: str, operations: list[Any]
    ) -> list[Mapping[str, Any]]:
        _check_size(operations)
        while True:
            try:
                return await self.submit(operations, "update the chat")
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
        self, state: ChatState, first_message: ChatMessage, applied: AppliedRequest
    ) -> Removal | None:
        """Create the chat afresh (the extension's create semantics); None if already applied.
        See ``worker.store.removal``."""
        existed = self._history.has(state.chat_id)
        self._forget(state.chat_id)
        removal = await reset_chat(self, state, first_message, applied, existed=existed)
        if removal is not None:
            # The chat now holds just this message: the first step need not read it.
            self._history.put(state.chat_id, state.created_at, [first_message])
        return removal

    async def delete_chat(self, chat_id: str, applied: AppliedRequest) -> Removal | None:
        """Delete the chat's rows; None if the request was applied already. In a table that
        does not exist there is nothing to delete (and no record can be written: only a
        create makes a table)."""
        self._forget(chat_id)
        try:
            return await delete_chat(self, chat_id, applied)
        except HttpResponseError as error:
            if table_missing(error):
                return Removal(rows_deleted=0, runs=())
            raise

    def _forget(self, chat_id: str) -> None:
        self._history.forget(chat_id)
        self._committed.forget(chat_id)

    async def submit(self, operations: list[Any], action: str) -> list[Mapping[str, Any]]:
        async with self.errors(action):
            async for attempt in _retrying():
                with attempt:
                    return list(await self.client.submit_transaction(operations))
        return []  # not reached: the last attempt raises


def _upsert(entity: dict[str, Any]) -> tuple[Any, ...]:
    return ("upsert", entity, {"mode": UpdateMode.REPLACE})


def _key_entity(chat_id: str, row_key: str) -> dict[str, Any]:
    return {"PartitionKey": chat_id, "RowKey": row_key}


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
