"""Memory follows ``WORKER_CACHE_MB``, not the number of chats or of names in messages
(issue 13, item 7): one byte-bounded LRU (``worker.store.cache.ChatMemory``) holds the
histories and last commits of every table; the stores, queue clients and model clients are
bounded too, and whoever holds an evicted one keeps working.

The pure cache is tested without I/O; the stores and the queue broker on Azurite; the whole
worker through the real queues with the fake model.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ChatRows,
    burst,
    chat_rows,
    create_body,
    model_env,
    poison_letters,
    post_body,
    tool_registry,
)
from tests.test_store import applied, fresh_state, system
from worker.app import open_app
from worker.backends.clients import ModelClients
from worker.config.settings import Settings
from worker.connections.clients import queue_service
from worker.queues.azure import AzureQueueBroker
from worker.runs.model import Run
from worker.store.cache import (
    ENTRY_OVERHEAD,
    MIB,
    ChatMemory,
    CommittedCache,
    HistoryCache,
)
from worker.store.layout import ChatMessage, ChatState, message_from_entity
from worker.store.stores import MIN_STORES, ChatStores
from worker.testing import FakeOpenAI

CREATED = datetime(2026, 1, 2, tzinfo=UTC)


def said(chat: int, index: int, size: int) -> ChatMessage:
    """A message as a store reads it from its row (its own strings, a parsed date)."""
    return message_from_entity(
        {
            "RowKey": f"msg-{index:04x}",
            "Role": "User" if index % 2 else "Assistant",
            "CreatedAt": CREATED + timedelta(seconds=index),
            "Content": f"chat {chat} message {index} " + "x" * size,
            "RunId": f"run_000001_{chat:08x}",
        }
    )


def a_run(chat: int) -> Run:
    return Run(
        run_id=f"run_000001_{chat:08x}",
        seq=1,
        status="in_progress",
        request_id=f"post-{chat}",
        user_message=f"question {chat} " + "y" * 200,
        api="chat",
        model="gpt-4o-mini",
        created_at=CREATED,
        expires_at=CREATED + timedelta(minutes=10),
        params={"chatModel": "gpt-4o-mini", "maxTokens": 1000 + chat},
        etag=f'W/"datetime{chat}"',
    )


def a_state(chat: int) -> ChatState:
    return ChatState(f"chat-{chat}", True, CREATED, CREATED, 3, 0, {"chatModel": "m"})


# --- the cache, without I/O -----------------------------------------------------------------


def test_one_budget_for_every_table_least_recently_used_first_out() -> None:
    """Histories and commits of two tables share one budget: it is never exceeded, the
    chats used last stay, the others go first; a chat read again is used again."""
    memory = ChatMemory(200_000)
    one, other = HistoryCache(memory, "s|One"), HistoryCache(memory, "s|Other")
    committed = CommittedCache(memory, "s|One")
    for chat in range(200):
        view = one if chat % 2 else other
        view.put(f"chat-{chat}", CREATED, [said(chat, i, 500) for i in range(1, 4)])
        committed.put(a_state(chat), {a_run(chat).run_id: a_run(chat)}, {})
        if chat >= 1:
            assert one.get("chat-1", CREATED), "a chat used at every turn stays"
        assert memory.used <= memory.budget
    assert one.get("chat-199", CREATED) and committed.take("chat-199", a_run(199).run_id)
    assert not other.get("chat-0", CREATED), "the least recently used went first"
    assert not one.get("chat-199", CREATED + timedelta(seconds=1)), "keyed by CreatedAt"
    assert not other.has("chat-199") and one.has("chat-199"), "keyed by table"
    assert len(memory) < 400


def test_an_entry_larger_than_an_eighth_of_the_budget_is_not_kept() -> None:
    """A very long chat (or one very large message) is not cached at all, and does not push
    the others out; a chat that grows past the limit is forgotten."""
    memory = ChatMemory(80_000)
    history = HistoryCache(memory, "s|T")
    history.put("small", CREATED, [said(1, 1, 100)])
    history.put("huge", CREATED, [said(2, 1, 20_000)])
    assert history.get("small", CREATED) and not history.has("huge")

    growing = [said(3, 1, 4_000)]
    history.put("growing", CREATED, growing)
    assert history.has("growing")
    history.extend("growing", CREATED, [said(3, 2, 8_000)])
    assert not history.has("growing"), "past an eighth of the budget: forgotten"
    assert history.get("small", CREATED)


def test_no_budget_caches_nothing() -> None:
    """``WORKER_CACHE_MB=0``: nothing is kept (every step reads its history)."""
    memory = ChatMemory(0)
    HistoryCache(memory, "s|T").put("chat", CREATED, [said(1, 1, 10)])
    CommittedCache(memory, "s|T").put(a_state(1), {}, {})
    assert len(memory) == 0 and memory.used == 0


def test_the_estimate_follows_what_the_entries_take() -> None:
    """The sizes the budget counts are within 25 % of what the entries take (tracemalloc):
    mixed chats, a fifth of their messages 30 KB tool outputs, and their last commits."""
    memory = ChatMemory(1024 * MIB)
    history = HistoryCache(memory, "AzureWebJobsStorage|ChatState")
    committed = CommittedCache(memory, "AzureWebJobsStorage|ChatState")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for chat in range(300):
            sizes = [100, 200, 30_000, 500, 300] if chat % 2 else [100, 200, 150, 400, 30_000]
            messages = [said(chat, i, size) for i, size in enumerate(sizes, start=1)]
            history.put(f"chat-{chat}", CREATED, messages)
            run_row = a_run(chat)
            committed.put(replace(a_state(chat), etag=f"e{chat}"), {run_row.run_id: run_row}, {})
        gc.collect()
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 * taken <= memory.used <= 1.25 * taken, (memory.used, taken)
    assert memory.used >= 600 * ENTRY_OVERHEAD


# --- stores and clients on Azurite --------------------------------------------------------


def test_stores_are_bounded_and_an_evicted_one_keeps_working(storage: StorageEnv) -> None:
    """Past ``max_stores`` tables the least recently used store goes (closed). A handler that
    still holds it goes on using it; the store made anew for its table finds what the old
    one remembered (the memory is keyed by table, not by store)."""

    async def scenario() -> None:
        stores = ChatStores(storage.settings(WORKER_CACHE_MB="1"))
        try:
            assert stores.max_stores == MIN_STORES
            held = await stores.get("AzureWebJobsStorage", storage.table, create=True)
            assert await held.reset_chat(fresh_state("kept"), system(), applied("c1"))
            for n in range(stores.max_stores):
                await stores.get("AzureWebJobsStorage", f"Other{n}{storage.suffix}")
            assert stores.cached() == stores.max_stores

            state = await held.load_state("kept")
            assert state is not None
            await held.commit(
                replace(state, total_messages=2),
                messages=[ChatMessage(2, "User", "still here", state.created_at)],
            )
            again = await stores.get("AzureWebJobsStorage", storage.table)
            assert again is not held
            fresh = await again.load_state("kept")
            assert fresh is not None
            assert [m.content for m in again._history.get("kept", fresh.created_at)] == [
                "be brief",
                "still here",
            ], "the new store finds the old one's memory"
        finally:
            await stores.close()

    run(scenario())


def test_queue_clients_and_known_names_are_bounded(storage: StorageEnv) -> None:
    """Reply queues are named by producers: the broker keeps clients for the queues used
    last only, and a sender holding an evicted client still sends."""

    async def scenario() -> tuple[int, int, int]:
        broker = AzureQueueBroker(
            queue_service(storage.settings().default_storage), max_queues=4, max_known=4
        )
        try:
            held = broker.queue(f"replies-0-{storage.suffix}")
            for n in range(10):
                await broker.send(f"replies-{n}-{storage.suffix}", "{}")
            kept = broker.cached()
            await held.client.send_message("{}")
            return (*kept, await storage.count(f"replies-0-{storage.suffix}"))
        finally:
            await broker.close()

    clients, known, delivered = run(scenario())
    assert (clients, known) == (4, 4)
    assert delivered == 2


def test_model_clients_are_bounded(storage: StorageEnv) -> None:
    """Clients come from configuration only (an unknown ``aiConnectionName`` is refused
    before one is built), and at most ``max_clients`` are kept."""
    env = {f"conn{n}__endpoint": f"https://conn{n}.example.com" for n in range(6)}
    env |= {f"conn{n}__key": "k" for n in range(6)}
    names = ",".join(f"conn{n}" for n in range(6))
    settings = Settings.from_env(
        {**storage.env(), **env, "WORKER_AI_CONNECTIONS": names, "OPENAI_API_KEY": "k"}
    )

    async def scenario() -> int:
        clients = ModelClients(settings, max_clients=3)
        try:
            for n in range(6):
                clients.client(f"conn{n}")
            for n in range(20):
                with contextlib.suppress(Exception):
                    clients.client(f"unknown{n}")
            return clients.cached()
        finally:
            await clients.close()

    assert run(scenario()) == 3


# --- the worker, through the real queues ---------------------------------------------------


def test_the_worker_keeps_to_its_budget_over_many_chats_and_tables(storage: StorageEnv) -> None:
    """With ``WORKER_CACHE_MB=1`` (512 KiB for chats, 8 stores), 24 weather-bot chats with
    30 KB instructions over 12 tables: every run completes, the chats' memory never passes
    its budget (it evicts), and no more than 8 stores are kept."""
    tables = [f"Budget{n}{storage.suffix}" for n in range(12)]
    chats = [(f"chat-{n}", tables[n % len(tables)]) for n in range(24)]
    instructions = "Answer about the weather. " + "Be precise. " * 2_500

    async def scenario() -> dict[str, Any]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(**model_env(fake.base_url), WORKER_CACHE_MB="1")
            for chat_id, table in chats:
                await storage.send(create_body(chat_id, table, instructions=instructions))
            await burst(settings)
            for chat_id, table in chats:
                await storage.send(post_body(chat_id, table, "What's the weather?"))
            async with open_app(settings, tools=tool_registry()) as app:
                await asyncio.wait_for(app.worker.run_until_idle(), timeout=120)
                memory = app.stores.memory
                kept = {
                    "used": memory.used,
                    "budget": memory.budget,
                    "entries": len(memory),
                    "stores": app.stores.cached(),
                }
            return {
                **kept,
                "rows": [await chat_rows(storage, c, t) for c, t in chats],
                "letters": await poison_letters(storage),
            }

    result = run(scenario())
    assert result["letters"] == []
    rows: list[ChatRows] = result["rows"]
    assert all([r["Status"] for r in chat.runs] == ["completed"] for chat in rows)
    assert result["budget"] == 1 * MIB - 8 * 64 * 1024
    assert 0 < result["used"] <= result["budget"]
    assert result["entries"] < 2 * len(chats), "some chats were evicted"
    assert result["stores"] == MIN_STORES
