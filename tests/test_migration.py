"""Moving chats off the legacy Assistants API, end to end on Azurite and the fake model.

The history is the worker's (the chat table), so a chat that began on ``assistants`` goes on
with ``responses`` and ``chat`` (a post's ``api``), and back to ``assistants``, without losing a
message: each API is shown the whole conversation, tool rounds included, and a thread the other
APIs' turns are missing from is replaced by one seeded from the table. A chat created without an
``api`` follows ``WORKER_MODEL_API``, so changing that moves every such chat.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.env import StorageEnv, run
from tests.support.runs import (
    WEATHER_ANSWER,
    ReplyQueue,
    burst,
    chat_rows,
    create_body,
    history_problems,
    model_env,
    post_body,
)
from worker.testing import FakeOpenAI, RecordedRequest

QUESTION_WEATHER = "What's the weather like right now in my favorite city?"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the Assistants API


def bodies(requests: list[RecordedRequest], method: str, suffix: str) -> list[dict[str, Any]]:
    return [
        r.json
        for r in requests
        if r.method == method and r.path.endswith(suffix) and r.status == 200
    ]


def texts_of(items: list[dict[str, Any]]) -> list[str]:
    """The texts of the message items of a Responses input or a Chat Completions request."""
    return [str(item["content"]) for item in items if isinstance(item.get("content"), str)]


def test_a_chat_moves_off_assistants_and_back_without_losing_a_message(
    storage: StorageEnv,
) -> None:
    chat_id = f"move-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[list[RecordedRequest], Any]:
        async with FakeOpenAI(background_delay=0.05) as fake:
            settings = storage.settings(**model_env(fake.base_url))
            await storage.send(create_body(chat_id, storage.table, api="assistants"))
            turns: list[tuple[str, str | None]] = [
                ("first, on assistants", None),
                ("second, on responses", "responses"),
                ("third, on chat", "chat"),
                ("fourth, back on assistants", None),
            ]
            marks: list[int] = []
            for number, (label, api) in enumerate(turns, start=1):
                fields = {"api": api} if api else {}
                text = f"{QUESTION_WEATHER} ({label})"
                await storage.send(
                    post_body(chat_id, storage.table, text, replyTo=replies.name, **fields)
                )
                marks.append(len(fake.requests))
                await burst(settings)
                await replies.wait_for("assistantReply", 10, count=number)
            return fake.requests, (marks, await chat_rows(storage, chat_id, storage.table))

    requests, (marks, rows) = run(scenario())

    assert [(r["status"], r["content"]) for r in replies.events] == [
        ("completed", WEATHER_ANSWER)
    ] * 4
    assert [run["Api"] for run in rows.runs] == ["assistants", "responses", "chat", "assistants"]
    # One history, in the table: four weather turns of three model calls each.
    turn_roles = ["User", "Assistant", "Tool", "Assistant", "Tool", "Tool", "Assistant"]
    assert rows.roles == ["System", *turn_roles * 4]
    assert history_problems(rows.messages) == []

    # The second turn's first response is given the whole first turn (the assistants one),
    # tool rounds included, then the new question.
    second = bodies(requests[marks[1] : marks[2]], "POST", "/responses")[0]["input"]
    kinds = [item.get("type", "message") for item in second]
    assert kinds.count("function_call") == 3 and kinds.count("function_call_output") == 3
    assert texts_of(second) == [
        "You are a weather bot.",
        f"{QUESTION_WEATHER} (first, on assistants)",
        WEATHER_ANSWER,
        f"{QUESTION_WEATHER} (second, on responses)",
    ]
    # The third (chat) is shown both earlier turns.
    third = bodies(requests[marks[2] : marks[3]], "POST", "/chat/completions")[0]["messages"]
    assert [m["role"] for m in third].count("tool") == 6
    assert [m["content"] for m in third if m["role"] == "user"] == [
        f"{QUESTION_WEATHER} (first, on assistants)",
        f"{QUESTION_WEATHER} (second, on responses)",
        f"{QUESTION_WEATHER} (third, on chat)",
    ]
    # Back on assistants: the old thread misses two turns, so a new one is seeded from the
    # table (and the first thread was the only one before).
    threads = bodies(requests, "POST", "/threads")
    assert len(threads) == 2
    assert len(bodies(requests[: marks[1]], "POST", "/threads")) == 1
    seeded = [m["content"] for m in threads[1]["messages"]]
    assert seeded == [
        f"{QUESTION_WEATHER} (first, on assistants)",
        WEATHER_ANSWER,
        f"{QUESTION_WEATHER} (second, on responses)",
        WEATHER_ANSWER,
        f"{QUESTION_WEATHER} (third, on chat)",
        WEATHER_ANSWER,
    ]


def test_chats_without_an_api_follow_the_default_model_api(storage: StorageEnv) -> None:
    """The operator's switch: WORKER_MODEL_API from assistants to responses moves the chats
    created without an ``api``, history and all; a chat that pinned ``assistants`` stays."""
    follows, pinned = f"follows-{storage.suffix}", f"pinned-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> Any:
        async with FakeOpenAI(background_delay=0.05) as fake:
            before = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="gpt-4o"),
                WORKER_MODEL_API="assistants",
            )
            after = before.with_values(model_api="responses")
            await storage.send(create_body(follows, storage.table))
            await storage.send(create_body(pinned, storage.table, api="assistants"))
            for chat_id in (follows, pinned):
                await storage.send(post_body(chat_id, storage.table, "one", replyTo=replies.name))
            await burst(before)
            await replies.wait_for("assistantReply", 10, count=2)
            for chat_id in (follows, pinned):
                await storage.send(post_body(chat_id, storage.table, "two", replyTo=replies.name))
            await burst(after)
            await replies.wait_for("assistantReply", 10, count=4)
            return (
                fake.requests,
                await chat_rows(storage, follows, storage.table),
                await chat_rows(storage, pinned, storage.table),
            )

    requests, follows_rows, pinned_rows = run(scenario())
    assert [r["Api"] for r in follows_rows.runs] == ["assistants", "responses"]
    assert [r["Api"] for r in pinned_rows.runs] == ["assistants", "assistants"]
    [moved] = bodies(requests, "POST", "/responses")
    assert texts_of(moved["input"]) == [
        "You are a weather bot.",
        "one",
        "You said: one",
        "two",
    ]
    assert {r["status"] for r in replies.events} == {"completed"}
