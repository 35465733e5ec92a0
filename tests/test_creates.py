"""Creates on Azurite: a new chat costs one table request; a create that finds rows falls
back to the reset path (a redelivery is a duplicate, an existing chat is reset, a post racing
it is reset away and its run reported)."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from handlers.create import CreateHandler
from schemas import AssistantCreate, parse_message
from tests.support.env import StorageEnv, run
from tests.support.runs import services_on
from tests.test_store import NOW, append, applied, fresh_state, make_run, system, watching
from worker.connections.clients import table_service
from worker.devtools.azurite import SplitAzurite
from worker.loop.errors import StorageUnavailable
from worker.loop.handling import MessageContext
from worker.store.layout import ChatMessage, request_row_key
from worker.store.removal import Removal
from worker.store.stores import ChatStores
from worker.store.tables import TableChatStore

Requests = Counter[tuple[str, str, str]]


@asynccontextmanager
async def counted(storage: StorageEnv) -> AsyncIterator[tuple[TableChatStore, Requests]]:
    """The test's store, counting every table request made after the table was created."""
    requests: Requests = Counter()

    def observe(service: str, method: str, status: str) -> None:
        requests[(service, method, status)] += 1

    stores = ChatStores(storage.settings(), lambda c: table_service(c, observe))
    try:
        store = await stores.get("AzureWebJobsStorage", storage.table, create=True)
        requests.clear()
        yield store, requests
    finally:
        await stores.close()


def create_handler(store: TableChatStore, storage: StorageEnv) -> CreateHandler:
    return CreateHandler(services_on(store, storage.settings(), lambda: datetime.now(UTC)))


def create_message(chat_id: str, table: str) -> AssistantCreate:
    message = parse_message(
        {
            "type": "assistantCreate",
            "id": chat_id,
            "instructions": "Be brief.",
            "collectionName": table,
        }
    )
    assert isinstance(message, AssistantCreate)
    return message


def context(request_id: str) -> MessageContext:
    return MessageContext("requests", f"m-{request_id}", 1, request_id)


def test_a_create_of_a_new_chat_is_one_table_request(storage: StorageEnv) -> None:
    """Through the handler: one transaction (state, system message, applied record), no read."""
    chat_id = f"new-{storage.suffix}"

    async def scenario() -> tuple[str, Requests]:
        async with counted(storage) as (store, requests):
            handler = create_handler(store, storage)
            result = await handler(create_message(chat_id, storage.table), context("c-1"))
            return result.note, Counter(requests)

    note, requests = run(scenario())
    assert note == "created"
    assert requests == {("table", "POST", "202"): 1}, requests
    rows = run(storage.partition(chat_id, storage.table))
    assert set(rows) == {"state", "msg-0001", request_row_key("c-1")}
    assert rows["state"]["TotalMessages"] == 1
    assert rows["msg-0001"]["Content"] == "Be brief."


def test_a_redelivered_create_is_a_duplicate_and_keeps_later_posts(storage: StorageEnv) -> None:
    chat_id = f"dup-{storage.suffix}"

    async def scenario() -> tuple[str, list[str], int]:
        async with counted(storage) as (store, requests):
            handler = create_handler(store, storage)
            message = create_message(chat_id, storage.table)
            assert (await handler(message, context("c-1"))).note == "created"
            await append(store, chat_id, [ChatMessage(0, "User", "later", NOW)])
            requests.clear()
            again = await handler(message, context("c-1"))
            # This process knows the chat exists (it created it), so the reset path starts
            # with the listing: the listing, the final transaction failing on the record
            # (nothing deleted), and the read confirming it.
            assert sum(requests.values()) == 3, requests
            assert requests[("table", "GET", "200")] == 2, requests
            messages = await store.read_messages(chat_id)
            state = await store.load_state(chat_id)
            assert state is not None
            return again.note, [m.content for m in messages], state.total_messages

    note, contents, total = run(scenario())
    assert note == "duplicate"
    assert contents == ["Be brief.", "later"]
    assert total == 2


def test_a_create_over_an_existing_chat_resets_it(storage: StorageEnv) -> None:
    """A new requestId on an existing chat: the fast path finds the rows (409), the reset
    removes the chat's messages and runs, reports the runs, and keeps the applied records."""
    chat_id = f"over-{storage.suffix}"

    async def scenario() -> tuple[Removal | None, list[str], set[str]]:
        async with counted(storage) as (store, _):
            assert await store.reset_chat(fresh_state(chat_id), system("old"), applied("c-1"))
            state = await append(store, chat_id, [ChatMessage(0, "User", "hi", NOW)])
            queued = replace(make_run(1, "queued"), reply_to="replies")
            await store.commit(replace(state, next_run_seq=2), runs=[(queued, True)])
            removed = await store.reset_chat(fresh_state(chat_id), system("new"), applied("c-2"))
            messages = await store.read_messages(chat_id)
            rows = await storage.partition(chat_id, storage.table)
            return removed, [m.content for m in messages], set(rows)

    removed, contents, rows = run(scenario())
    assert removed is not None
    assert [r.run_id for r in removed.runs] == [make_run(1, "queued").run_id]
    assert contents == ["new"]
    assert rows == {"state", "msg-0001", request_row_key("c-1"), request_row_key("c-2")}


def test_a_reset_of_a_chat_without_runs_reads_no_applied_record(storage: StorageEnv) -> None:
    """In a process that has not seen the chat, the create fails on the ``state`` row, after
    the record: so the record did not exist, and the reset lists the rows and writes, three
    requests in all. A process that has the chat in memory lists it at once: two."""
    chat_id = f"plain-{storage.suffix}"

    async def scenario() -> list[tuple[Removal | None, Counter[str], list[str]]]:
        results = []
        async with counted(storage) as (store, _):
            assert await store.reset_chat(fresh_state(chat_id), system("old"), applied("c-1"))
            for attempt, seen in enumerate((False, True)):
                async with counted(storage) as (other, other_requests):
                    resetter, requests = (store, _) if seen else (other, other_requests)
                    await append(store, chat_id, [ChatMessage(0, "User", "hi", NOW)])
                    requests.clear()
                    removed = await resetter.reset_chat(
                        fresh_state(chat_id), system(f"new {attempt}"), applied(f"c-{attempt + 2}")
                    )
                    methods = Counter(method for (_, method, _) in requests.elements())
                    contents = [m.content for m in await store.read_messages(chat_id)]
                    results.append((removed, methods, contents))
        return results

    (fresh, fresh_methods, fresh_contents), (seen, seen_methods, seen_contents) = run(scenario())
    assert fresh == seen == Removal(rows_deleted=1, runs=())
    assert fresh_contents == ["new 0"] and seen_contents == ["new 1"]
    assert fresh_methods == {"POST": 2, "GET": 1}, fresh_methods
    assert seen_methods == {"POST": 1, "GET": 1}, seen_methods


def test_a_create_racing_a_post_resets_the_post_away(storage: StorageEnv) -> None:
    """The create finds the chat (its first transaction fails), lists it, and a post commits
    before the reset's final transaction: that one fails on the changed ``state`` row, the pass
    starts over, and the post goes with the rest, its run reported."""
    chat_id = f"racepost-{storage.suffix}"

    async def scenario() -> tuple[Removal | None, list[list[Any]], list[str]]:
        async with counted(storage) as (store, _):
            assert await store.reset_chat(fresh_state(chat_id), system("old"), applied("c-1"))
            raced: list[bool] = []

            async def post_meanwhile(operations: list[Any]) -> None:
                if not raced:
                    raced.append(True)
                    state = await store.load_state(chat_id)
                    assert state is not None
                    late = replace(make_run(1, "queued"), reply_to="replies")
                    await store.commit(
                        replace(state, next_run_seq=2, total_messages=2),
                        runs=[(late, True)],
                        messages=[ChatMessage(2, "User", "racing", NOW)],
                    )

            log = watching(store, post_meanwhile)
            removed = await store.reset_chat(fresh_state(chat_id), system("new"), applied("c-2"))
            return removed, log, [m.content for m in await store.read_messages(chat_id)]

    removed, log, contents = run(scenario())
    record = request_row_key("c-2")
    finals = [ops for ops in log if any(op[1]["RowKey"] == record for op in ops)]
    assert len(finals) == 2  # the first lost to the post
    assert removed is not None
    assert [r.run_id for r in removed.runs] == [make_run(1, "queued").run_id]
    assert contents == ["new"]


def test_concurrent_creates_of_one_new_chat_end_with_one_chat(storage: StorageEnv) -> None:
    """Two creates (different requestIds) of one new chat at once: one creates it, the other
    resets it; both are recorded and the chat has its one system message."""
    chat_id = f"twice-{storage.suffix}"

    async def scenario() -> tuple[list[Removal | None], dict[str, Any]]:
        async with counted(storage) as (store, _):
            results = await asyncio.gather(
                store.reset_chat(fresh_state(chat_id), system("a"), applied("c-a")),
                store.reset_chat(fresh_state(chat_id), system("b"), applied("c-b")),
            )
            return list(results), await storage.partition(chat_id, storage.table)

    results, rows = run(scenario())
    assert all(result is not None for result in results)
    assert set(rows) == {"state", "msg-0001", request_row_key("c-a"), request_row_key("c-b")}
    assert rows["state"]["TotalMessages"] == 1


def test_a_create_during_a_storage_outage_is_storage_unavailable(
    split_azurite: SplitAzurite,
) -> None:
    """The first transaction classifies failures like every store call: the table service
    not answering (its process stopped) is an outage, after the transaction's quick retries."""
    storage = StorageEnv.fresh(split_azurite)
    chat_id = f"outage-{storage.suffix}"

    async def scenario() -> tuple[BaseException | None, Requests]:
        async with counted(storage) as (store, requests):
            split_azurite.stop_table()
            try:
                await store.reset_chat(fresh_state(chat_id), system(), applied("c-1"))
            except Exception as error:
                return error, requests
            finally:
                split_azurite.start_table()
            return None, requests

    error, requests = run(scenario())
    assert isinstance(error, StorageUnavailable), error
    assert requests[("table", "POST", "error")] >= 3, requests
