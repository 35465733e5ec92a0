"""The chat store on Azurite: large properties, tool results, the run queue, commits with
deletes and size limits, and resets that never make the chat look missing."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.env import StorageEnv, run
from worker.loop.errors import PermanentError
from worker.runs.model import Run, RunStatus
from worker.store.layout import (
    MAX_PROPERTY_UNITS,
    MAX_TEXT_UNITS_PER_ROW,
    AppliedRequest,
    ChatMessage,
    ChatState,
    message_entity,
    request_row_key,
    tool_result_row_key,
    utf16_units,
)
from worker.store.protocol import Conflict
from worker.store.removal import Removal, list_rows
from worker.store.stores import ChatStores
from worker.store.tables import TableChatStore

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
MARKER = "[truncated by assistant-worker:"


@asynccontextmanager
async def opened(storage: StorageEnv) -> AsyncIterator[TableChatStore]:
    stores = ChatStores(storage.settings())
    try:
        yield await stores.get("AzureWebJobsStorage", storage.table, create=True)
    finally:
        await stores.close()


def fresh_state(chat_id: str, **changes: Any) -> ChatState:
    return replace(ChatState(chat_id, True, NOW, NOW, 1, 0, {"chatModel": "m"}), **changes)


def system(content: str = "be brief") -> ChatMessage:
    return ChatMessage(1, "System", content, NOW)


def applied(request_id: str, message_type: str = "assistantCreate") -> AppliedRequest:
    return AppliedRequest(request_id, message_type, f"m-{request_id}", NOW)


async def create(store: TableChatStore, chat_id: str, request_id: str = "create-1") -> ChatState:
    assert await store.reset_chat(fresh_state(chat_id), system(), applied(request_id))
    state = await store.load_state(chat_id)
    assert state is not None
    return state


async def append(
    store: TableChatStore, chat_id: str, messages: list[ChatMessage], **commit: Any
) -> ChatState:
    """Commit ``messages`` (numbered from the chat's next index) and return the new state."""
    state = await store.load_state(chat_id)
    assert state is not None
    numbered = [replace(m, index=state.total_messages + n) for n, m in enumerate(messages, start=1)]
    changed = replace(state, total_messages=state.total_messages + len(messages))
    await store.commit(changed, messages=numbered, **commit)
    after = await store.load_state(chat_id)
    assert after is not None
    return after


def make_run(seq: int, status: RunStatus) -> Run:
    return Run(
        run_id=f"run_{seq:06d}_{seq:010x}",
        seq=seq,
        status=status,
        request_id=f"post-{seq}",
        user_message=f"question {seq}",
        api="chat",
        model="m",
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
    )


def test_large_tool_calls_are_stored_and_read_back(storage: StorageEnv) -> None:
    """An assistant message with 100 KiB of tool-call JSON reads back whole; the extension's
    ``ToolCalls`` property holds its beginning."""
    chat_id = f"calls-{storage.suffix}"
    calls = json.dumps(
        [
            {
                "id": f"call_{i}",
                "functionName": "write_file",
                "functionArguments": json.dumps({"text": "línea 😀 " * 1_000}),
                "kind": "function",
            }
            for i in range(10)
        ]
    )
    assert len(calls.encode()) > 100 * 1024

    async def scenario() -> list[ChatMessage]:
        async with opened(storage) as store:
            await create(store, chat_id)
            await append(store, chat_id, [ChatMessage(0, "Assistant", "", NOW, tool_calls=calls)])
            return await store.read_messages(chat_id)

    messages = run(scenario())
    assert messages[-1].tool_calls == calls
    row = run(storage.partition(chat_id, storage.table))["msg-0002"]
    assert calls.startswith(row["ToolCalls"])
    assert utf16_units(row["ToolCalls"]) <= MAX_PROPERTY_UNITS
    assert row["ToolCallsParts"] > 1


def test_a_huge_tool_output_is_stored_capped(storage: StorageEnv) -> None:
    """A 1.5 MB tool output is stored cut to what a row holds, with a marker; the same call
    id in another round is another result."""
    chat_id = f"output-{storage.suffix}"
    output = "0123456789abcdef\n" * 90_000  # 1.53 MB

    async def scenario() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        async with opened(storage) as store:
            await create(store, chat_id)
            await store.save_tool_result(chat_id, "run_000001_a", 1, "call_1", output)
            await store.save_tool_result(chat_id, "run_000001_a", 2, "call_1", "round two")
            await store.save_tool_result(chat_id, "run_000001_a", 2, "call/2", "slash")
            return (
                await store.tool_results(chat_id, "run_000001_a", 1),
                await store.tool_results(chat_id, "run_000001_a", 2),
                await store.tool_results(chat_id, "run_000001_a", 3),
            )

    first, second, third = run(scenario())
    stored = first["call_1"]
    assert MARKER in stored
    assert f"{len(output)} characters were received" in stored
    assert output.startswith(stored.split("\n\n[truncated", 1)[0])
    assert MAX_TEXT_UNITS_PER_ROW - 200 < utf16_units(stored) <= MAX_TEXT_UNITS_PER_ROW
    assert second == {"call_1": "round two", "call/2": "slash"}
    assert third == {}


def test_next_queued_run_skips_finished_and_older_runs(storage: StorageEnv) -> None:
    """Only a queued run after the given sequence number is found, the earliest first."""
    chat_id = f"queue-{storage.suffix}"
    statuses: list[RunStatus] = ["completed", "queued", "in_progress", "completed", "failed"]
    statuses += ["queued", "queued"]

    async def scenario() -> list[int | None]:
        async with opened(storage) as store:
            state = await create(store, chat_id)
            runs = [(make_run(seq, status), True) for seq, status in enumerate(statuses, 1)]
            await store.commit(replace(state, next_run_seq=len(runs) + 1), runs=runs)
            found = []
            for after in (0, 2, 3, 6, 7, 100):
                queued = await store.next_queued_run(chat_id, after)
                found.append(queued.seq if queued else None)
            assert len(await store.runs(chat_id)) == len(statuses)
            return found

    assert run(scenario()) == [2, 6, 6, 7, None, None]


def test_commit_deletes_rows_in_the_same_transaction(storage: StorageEnv) -> None:
    """A round's tool-result rows go with the commit that stores them as messages; a row
    already gone does not fail the commit."""
    chat_id = f"deletes-{storage.suffix}"
    run_id = "run_000001_a"

    async def scenario() -> tuple[dict[str, str], list[ChatMessage]]:
        async with opened(storage) as store:
            await create(store, chat_id)
            for call in ("call_1", "call_2"):
                await store.save_tool_result(chat_id, run_id, 1, call, f"out {call}")
            keys = [tool_result_row_key(run_id, 1, c) for c in ("call_1", "call_2", "gone")]
            tools = [ChatMessage(0, "Tool", f"out call_{n}", NOW, name=f"call_{n}") for n in (1, 2)]
            await append(store, chat_id, tools, deletes=keys)
            return await store.tool_results(chat_id, run_id, 1), await store.read_messages(chat_id)

    left, messages = run(scenario())
    assert left == {}
    assert [m.content for m in messages[1:]] == ["out call_1", "out call_2"]
    rows = run(storage.partition(chat_id, storage.table))
    assert not [key for key in rows if key.startswith("tool-")]


def test_commit_state_is_merged_and_guarded(storage: StorageEnv) -> None:
    """The state row keeps properties the worker does not know; a stale ETag is a Conflict."""
    chat_id = f"merge-{storage.suffix}"

    async def scenario() -> dict[str, Any]:
        async with opened(storage) as store:
            state = await create(store, chat_id)
            await store.client.update_entity(
                {"PartitionKey": chat_id, "RowKey": "state", "FutureField": "kept"}
            )  # MERGE by default
            with pytest.raises(Conflict):
                await store.commit(replace(state, total_tokens=5))  # stale ETag
            fresh = await store.load_state(chat_id)
            assert fresh is not None
            await store.commit(replace(fresh, total_tokens=7))
            return dict(await store.client.get_entity(chat_id, "state"))

    row = run(scenario())
    assert row["FutureField"] == "kept"
    assert row["TotalTokens"] == 7


def test_a_commit_too_large_for_a_transaction_is_refused(storage: StorageEnv) -> None:
    """Past about 3.5 MiB a commit raises TooLarge and writes nothing."""
    chat_id = f"large-{storage.suffix}"
    big = [ChatMessage(0, "Tool", "é" * 300_000, NOW, name=f"call_{n}") for n in range(3)]

    async def scenario() -> PermanentError:
        async with opened(storage) as store:
            await create(store, chat_id)
            with pytest.raises(PermanentError) as caught:
                await append(store, chat_id, big)
            assert len(await store.read_messages(chat_id)) == 1
            return caught.value

    too_big = run(scenario())
    assert too_big.error_type == "TooLarge"
    assert "MiB" in str(too_big)


def test_more_messages_than_a_transaction_holds_are_stored_in_order(storage: StorageEnv) -> None:
    """A turn with 250 parallel tool calls is stored whole: the messages beyond one
    transaction go first, and the chat shows them all at once when the last one lands."""
    chat_id = f"many-{storage.suffix}"
    many = [ChatMessage(0, "Tool", f"result {n}", NOW, name=f"call_{n}") for n in range(250)]

    async def scenario() -> tuple[list[ChatMessage], ChatState | None, int]:
        async with opened(storage) as store:
            await create(store, chat_id)
            log = watching(store, _nothing)
            await append(store, chat_id, many)
            return await store.read_messages(chat_id), await store.load_state(chat_id), len(log)

    messages, state, transactions = run(scenario())
    assert transactions == 3
    assert [m.content for m in messages[1:]] == [f"result {n}" for n in range(250)]
    assert state is not None and state.total_messages == 251


def test_rows_past_the_total_left_by_a_failed_commit_are_not_read(storage: StorageEnv) -> None:
    """A commit that died after its first transactions leaves rows past ``TotalMessages``:
    readers do not show them, and the next commit overwrites them."""
    chat_id = f"orphans-{storage.suffix}"

    async def scenario() -> tuple[list[ChatMessage], list[ChatMessage]]:
        async with opened(storage) as store:
            await create(store, chat_id)
            orphan = ChatMessage(2, "Tool", "left over", NOW, name="c1")
            await store.client.upsert_entity(message_entity(chat_id, orphan))
            before = await store.read_messages(chat_id, 1)
            after = await append(store, chat_id, [ChatMessage(0, "User", "next", NOW)])
            return before, await store.read_messages(chat_id, after.total_messages)

    before, after = run(scenario())
    assert [m.content for m in before] == ["be brief"]
    assert [m.content for m in after] == ["be brief", "next"]


async def _nothing(_: list[Any]) -> None:
    return None


async def fill(store: TableChatStore, chat_id: str, rows: int) -> None:
    """Give the chat about ``rows`` rows: messages, runs, tool results, applied records."""
    state = await create(store, chat_id)
    runs = [(make_run(seq, "completed"), True) for seq in range(1, 11)]
    await store.commit(replace(state, next_run_seq=11), runs=runs, applied=applied("post-x", "p"))
    for n in range(10):
        await store.save_tool_result(chat_id, "run_000010_a", 1, f"call_{n}", "out")
    remaining = rows - 23
    while remaining > 0:
        count = min(remaining, 90)
        await append(store, chat_id, [ChatMessage(0, "User", "hi", NOW)] * count)
        remaining -= count


def watching(
    store: TableChatStore, before_submit: Callable[[list[Any]], Awaitable[None]]
) -> list[list[Any]]:
    """Call ``before_submit`` before each transaction of ``store``; returns their log."""
    submit = store.submit
    log: list[list[Any]] = []

    async def spied(operations: list[Any], action: str) -> list[Any]:
        await before_submit(operations)
        log.append(operations)
        return await submit(operations, action)

    store.submit = spied  # type: ignore[method-assign]
    return log


def test_a_reset_never_makes_the_chat_look_missing(storage: StorageEnv) -> None:
    """While a chat of 150 rows is reset, its state can be read at every point: between the
    reset's transactions and from a concurrent task."""
    chat_id = f"reset-{storage.suffix}"

    async def scenario() -> tuple[list[bool], int, list[list[Any]], ChatState | None]:
        async with opened(storage) as store:
            await fill(store, chat_id, 150)
            assert len(await list_rows(store, chat_id)) >= 149  # all but the req- records
            seen: list[bool] = []

            async def check(_: list[Any]) -> None:
                seen.append(await store.load_state(chat_id) is not None)

            log = watching(store, check)
            done = asyncio.Event()
            reads: list[bool] = []

            async def reader() -> None:
                while not done.is_set():
                    reads.append(await store.load_state(chat_id) is not None)
                    await asyncio.sleep(0)

            task = asyncio.create_task(reader())
            try:
                state = fresh_state(chat_id, defaults={"chatModel": "new"})
                assert await store.reset_chat(state, system("new"), applied("create-2"))
            finally:
                done.set()
                await task
            assert reads and all(reads), reads
            return seen, len(reads), log, await store.load_state(chat_id)

    seen, _, log, state = run(scenario())
    assert len(log) >= 2  # the deletes took more than one transaction
    assert all(seen)
    assert state is not None and state.defaults == {"chatModel": "new"}
    assert state.total_messages == 1
    rows = run(storage.partition(chat_id, storage.table))
    assert set(rows) - {key for key in rows if key.startswith("req-")} == {"state", "msg-0001"}
    assert len([key for key in rows if key.startswith("req-")]) == 3  # old records kept
    assert rows["msg-0001"]["Content"] == "new"


def test_a_reset_racing_a_commit_starts_over(storage: StorageEnv) -> None:
    """A post committed while the reset deletes is undone by the reset, which still ends
    with the new chat; a duplicate of the create applies nothing."""
    chat_id = f"race-{storage.suffix}"

    async def scenario() -> tuple[Removal | None, list[ChatMessage], ChatState | None]:
        async with opened(storage) as store:
            await fill(store, chat_id, 150)
            raced: list[bool] = []

            async def post_meanwhile(operations: list[Any]) -> None:
                if not raced and any(op[0] != "delete" for op in operations):
                    raced.append(True)  # before the reset's final transaction
                    await append(store, chat_id, [ChatMessage(0, "User", "racing", NOW)])

            log = watching(store, post_meanwhile)
            state = fresh_state(chat_id, defaults={"chatModel": "new"})
            assert await store.reset_chat(state, system("new"), applied("create-2"))
            assert raced
            record = request_row_key("create-2")
            finals = [ops for ops in log if any(op[1]["RowKey"] == record for op in ops)]
            assert len(finals) == 2  # the first final transaction lost to the post
            again = await store.reset_chat(state, system("new"), applied("create-2"))
            return again, await store.read_messages(chat_id), await store.load_state(chat_id)

    again, messages, state = run(scenario())
    assert again is None
    assert [m.content for m in messages] == ["new"]
    assert state is not None and state.total_messages == 1


def test_delete_removes_all_but_the_applied_records(storage: StorageEnv) -> None:
    """A delete of a chat of 150 rows removes them all (the state last) and records itself;
    a redelivery applies nothing."""
    chat_id = f"delete-{storage.suffix}"

    async def scenario() -> tuple[Removal | None, Removal | None, ChatState | None]:
        async with opened(storage) as store:
            await fill(store, chat_id, 150)
            record = applied("delete-1", "assistantDelete")
            first = await store.delete_chat(chat_id, record)
            return first, await store.delete_chat(chat_id, record), await store.load_state(chat_id)

    first, second, state = run(scenario())
    assert first is not None and first.rows_deleted >= 147
    assert second is None
    assert state is None
    rows = run(storage.partition(chat_id, storage.table))
    assert all(key.startswith("req-") for key in rows)


def test_a_reset_lists_no_applied_records_and_reports_a_run_that_arrived_mid_way(
    storage: StorageEnv,
) -> None:
    """Applied-request records grow with every request ever applied: a reset never lists them
    (its own is checked by a point read). A post whose run was stored while the reset was
    deleting is removed with the rest and named among the removed runs, so its producer gets
    a reply."""
    chat_id = f"reset-runs-{storage.suffix}"

    async def scenario() -> tuple[Removal | None, list[str], list[list[Any]]]:
        async with opened(storage) as store:
            await fill(store, chat_id, 150)
            for n in range(40):
                state = await store.load_state(chat_id)
                assert state is not None
                await store.commit(state, applied=applied(f"old-{n}", "assistantPost"))
            listed = await list_rows(store, chat_id)
            raced: list[bool] = []

            async def post_meanwhile(operations: list[Any]) -> None:
                if not raced and any(op[0] != "delete" for op in operations):
                    raced.append(True)
                    state = await store.load_state(chat_id)
                    assert state is not None
                    late = replace(make_run(99, "queued"), reply_to="replies")
                    await store.commit(state, runs=[(late, True)])

            watching(store, post_meanwhile)
            removed = await store.reset_chat(fresh_state(chat_id), system("new"), applied("c-2"))
            return removed, list(listed), []

    removed, listed, _ = run(scenario())
    assert not [key for key in listed if key.startswith("req-")]
    assert removed is not None
    assert "run_000099_0000000063" in [r.run_id for r in removed.runs]
