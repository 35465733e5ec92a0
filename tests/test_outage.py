"""A storage outage, for real: Azurite's table service is stopped while runs are polling their
background responses and posts keep arriving (the queue service stays up, as in a partial
Azure outage), then started again on its data.

Without the storage gate every message would burn its attempts against the dead service and
be dead-lettered within seconds (the test's retry delays are 1-2 s, five attempts). With it
the worker pauses receiving, keeps the failed messages leased in-process, and when the table
service answers again everything goes on: nothing is dead-lettered, every run completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ChatRows,
    ReplyQueue,
    chat_rows,
    create_body,
    eventually,
    model_env,
    poison_letters,
    post_body,
    serving,
)
from worker.devtools.azurite import SplitAzurite
from worker.testing import FakeOpenAI

CHATS = 4
QUESTION = "What's the weather like right now in my favorite city?"


@pytest.fixture
def split_storage(split_azurite: SplitAzurite) -> Iterator[StorageEnv]:
    yield StorageEnv.fresh(split_azurite)


def test_runs_survive_the_table_service_going_away(
    split_azurite: SplitAzurite, split_storage: StorageEnv
) -> None:
    """Table service down for longer than all the attempts of a message take: the worker
    pauses and reports it, then every run and every post sent meanwhile completes."""
    storage = split_storage
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    chats = [f"outage-{n}-{storage.suffix}" for n in range(CHATS)]

    async def scenario() -> tuple[list[dict[str, Any]], list[ChatRows], list[Any], int]:
        async with FakeOpenAI(background_delay=1.0) as fake:
            settings = storage.settings(
                **model_env(fake.base_url, WORKER_POLL_BACKOFF="1", WORKER_RUN_TIMEOUT="300")
            )
            for chat_id in chats:
                await storage.send(create_body(chat_id, storage.table, api="responses"))
            async with serving(settings) as app:
                gate = app.worker.gate
                assert gate is not None
                for chat_id in chats:
                    post = post_body(chat_id, storage.table, QUESTION, replyTo=replies.name)
                    await storage.send(post)
                # Wait until every run is polling a background response.
                await eventually(lambda: _all_polling(storage, chats), 30, "runs polling")
                split_azurite.stop_table()
                await eventually(lambda: _closed(gate.is_open), 30, "the gate to close")
                # Posts keep arriving while the tables are gone: they wait too.
                for chat_id in chats:
                    late = post_body(chat_id, storage.table, "And tomorrow?", replyTo=replies.name)
                    await storage.send(late)
                # Longer than five attempts at 1-2 s would last.
                await asyncio.sleep(12)
                assert not gate.is_open, "storage is still down: the worker stays paused"
                split_azurite.start_table()
                events = await replies.wait_for("assistantReply", 90, count=2 * CHATS)
                outages = gate.outages
            rows = [await chat_rows(storage, chat_id, storage.table) for chat_id in chats]
            return events, rows, await poison_letters(storage), outages

    events, rows, letters, outages = run(scenario())
    assert letters == [], [letter["deadLetter"]["reason"] for letter in letters]
    assert outages == 1
    assert sorted(event["status"] for event in events) == ["completed"] * (2 * CHATS)
    for chat in rows:
        assert [r["Status"] for r in chat.runs] == ["completed", "completed"]
        users = [m["Content"] for m in chat.messages if m["Role"] == "User"]
        assert users == [QUESTION, "And tomorrow?"], "each post stored once, in order"


async def _all_polling(storage: StorageEnv, chats: list[str]) -> bool:
    for chat_id in chats:
        try:
            rows = await chat_rows(storage, chat_id, storage.table)
        except ResourceNotFoundError:
            return False  # the worker has not created the table yet

        if not rows.runs or rows.runs[0].get("Phase") != "poll":
            return False
    return True


async def _closed(is_open: bool) -> bool:
    return not is_open
