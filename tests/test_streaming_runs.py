"""Streamed runs end to end, in-process: posts through real queues on Azurite, the fake model
streaming over real HTTP, the deltas on the replyTo queue or a real Redis server, assembled by
the consumer rule (``worker.client.stream``). Worker processes, crashes and faults:
``test_streaming_processes``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ChatRows,
    burst,
    chat_rows,
    create_body,
    duplicate_steps,
    model_env,
    post_body,
    tool_registry,
)
from worker.app import open_app
from worker.client.stream import DeltaAssembler, QueueEvents, RedisEvents, follow
from worker.config.settings import Settings
from worker.connections.clients import queue_service
from worker.devtools.redis_server import RedisServer
from worker.queues.azure import AzureQueueBroker
from worker.testing import FakeOpenAI

QUESTION = "What's the weather like right now in my favorite city?"
WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."
# The fake model streams a chunk every CHUNK seconds; the worker flushes every INTERVAL_MS.
CHUNK = 0.01
INTERVAL_MS = "40"


def streaming_env(base_url: str, **extra: str) -> dict[str, str]:
    return model_env(base_url, WORKER_STREAM_INTERVAL_MS=INTERVAL_MS, **extra)


async def create_chat(storage: StorageEnv, settings: Settings, body: dict[str, Any]) -> None:
    await storage.send(body)
    await burst(settings)


async def read_queue(
    settings: Settings, queue: str, request_id: str, seen: list[dict[str, Any]]
) -> DeltaAssembler:
    """Every event of ``request_id`` on ``queue``, by the consumer rule (``seen``: as read)."""
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    try:
        return await follow(QueueEvents(broker, queue, request_id), within=20, on_event=seen.append)
    finally:
        await broker.close()


async def make_queue(settings: Settings, queue: str) -> None:
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    try:
        await broker.ensure_queues([queue])
    finally:
        await broker.close()


def deltas_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "assistantDelta"]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_weather_bot_streams_its_answer_to_the_reply_queue(storage: StorageEnv, api: str) -> None:
    chat_id = f"stream-{api}-{storage.suffix}"
    replies = f"replies-{storage.suffix}"
    seen: list[dict[str, Any]] = []

    async def scenario() -> tuple[DeltaAssembler, ChatRows]:
        async with FakeOpenAI(background_delay=0.05, chunk_delay=CHUNK) as fake:
            settings = storage.settings(**streaming_env(fake.base_url))
            await create_chat(storage, settings, create_body(chat_id, storage.table, api=api))
            await make_queue(settings, replies)
            post = post_body(chat_id, storage.table, QUESTION, replyTo=replies,
                             requestId="ask-1", stream=True)  # fmt: skip
            await storage.send(post)
            await burst(settings)
            assembled = await read_queue(settings, replies, "ask-1", seen)
            return assembled, await chat_rows(storage, chat_id, storage.table)

    assembled, rows = run(scenario())
    reply = assembled.reply
    assert reply is not None and reply["status"] == "completed", reply
    assert reply["content"] == WEATHER_ANSWER
    assert assembled.complete
    assert assembled.text() == WEATHER_ANSWER == rows.messages[-1]["Content"]
    deltas = deltas_of(seen)
    assert reply["deltaCount"] == len(deltas)
    # Three model calls: the favourite city, the two parallel calls, then the answer.
    assert sorted({d["step"] for d in deltas}) == [0, 1, 2]
    assert {d["attempt"] for d in deltas} == {0}
    ends = {d["step"]: d["toolCalls"] for d in deltas if d["toolCalls"]}
    assert [c["name"] for c in ends[0]] == ["getUserFavoriteCity"]
    assert sorted(c["name"] for c in ends[1]) == ["getCityNickname", "getWeatherAtLocation"]
    answer = [d for d in deltas if d["step"] == 2]
    assert len(answer) >= 2, "the answer came in several deltas"
    assert [d["seq"] for d in sorted(answer, key=lambda d: d["seq"])] == list(range(len(answer)))


def test_a_streamed_call_stores_what_the_same_answer_sent_whole_stores(
    storage: StorageEnv,
) -> None:
    """The same scripted answers, streamed and not: the same messages (text with a character
    whose halves came in two chunks, two parallel tool calls whose arguments came in pieces)
    and the same usage."""
    turns: list[dict[str, Any]] = [
        {
            "content": "Checking 😀 now.",
            "tool_calls": [
                {"name": "note", "arguments": {"label": "first, with a long label"}},
                {"name": "note", "arguments": {"label": "second 🌦 label"}},
            ],
        },
        {"content": "All done 🌦 — thanks."},
    ]

    async def one(fake: FakeOpenAI, settings: Settings, stream: bool) -> ChatRows:
        chat_id = f"same-{stream}-{storage.suffix}"
        replies = f"same-{'s' if stream else 'p'}-{storage.suffix}"
        await make_queue(settings, replies)
        fake.script("scripted", turns)
        await create_chat(
            storage, settings, create_body(chat_id, storage.table, chatModel="scripted")
        )
        await storage.send(post_body(chat_id, storage.table, "go", replyTo=replies,
                                     requestId=f"go-{stream}", stream=stream))  # fmt: skip
        await burst(settings, tool_registry())
        seen: list[dict[str, Any]] = []
        assembled = await read_queue(settings, replies, f"go-{stream}", seen)
        assert assembled.reply is not None and assembled.reply["status"] == "completed"
        if stream:
            assert assembled.complete and assembled.reply["deltaCount"] == len(deltas_of(seen))
            assert assembled.text() == "Checking 😀 now.All done 🌦 — thanks."
        else:
            assert deltas_of(seen) == [] and assembled.reply["deltaCount"] is None
        return await chat_rows(storage, chat_id, storage.table)

    async def scenario() -> tuple[ChatRows, ChatRows, list[Any]]:
        async with FakeOpenAI(chunk_delay=CHUNK) as fake:
            settings = storage.settings(**streaming_env(fake.base_url))
            plain = await one(fake, settings, stream=False)
            streamed = await one(fake, settings, stream=True)
            calls = [r for r in fake.requests if r.endpoint == "chat.create"]
            return plain, streamed, calls

    plain, streamed, calls = run(scenario())
    assert [c.json.get("stream") for c in calls] == [None, None, True, True]
    assert all(c.json["stream_options"] == {"include_usage": True} for c in calls[2:])

    def comparable(rows: ChatRows) -> list[tuple[str, str, list[tuple[str, str]]]]:
        out = []
        for message in rows.messages:
            calls = json.loads(message.get("ToolCalls") or "[]")
            named = [(c["functionName"], c["functionArguments"]) for c in calls]
            out.append((message["Role"], message["Content"], named))
        return out

    assert comparable(streamed) == comparable(plain)
    assert streamed.messages[2]["Content"] == "Checking 😀 now."
    assert streamed.messages[-1]["Content"] == "All done 🌦 — thanks."
    [plain_run], [streamed_run] = plain.runs, streamed.runs
    assert streamed_run["Usage"] == plain_run["Usage"]
    assert json.loads(streamed_run["Usage"])["totalTokens"] > 0
    assert "Stream" not in plain_run and json.loads(streamed_run["Stream"])["calls"] == 2


def test_deltas_go_to_redis_and_the_reply_to_both(
    storage: StorageEnv, redis_server: RedisServer
) -> None:
    chat_id = f"redis-{storage.suffix}"
    replies = f"redis-replies-{storage.suffix}"
    on_redis: list[dict[str, Any]] = []

    async def scenario() -> tuple[DeltaAssembler, list[dict[str, Any]]]:
        async with FakeOpenAI(chunk_delay=CHUNK) as fake:
            settings = storage.settings(
                **streaming_env(fake.base_url, WORKER_STREAM_REDIS_URL=redis_server.url)
            )
            await make_queue(settings, replies)
            await create_chat(storage, settings, create_body(chat_id, storage.table, stream=True))
            await storage.send(post_body(chat_id, storage.table, QUESTION, replyTo=replies,
                                         requestId="ask-r"))  # fmt: skip
            await burst(settings)
            source = RedisEvents(redis_server.url, chat_id, "ask-r")
            assembled = await follow(source, within=20, on_event=on_redis.append)
            on_queue: list[dict[str, Any]] = []
            await read_queue(settings, replies, "ask-r", on_queue)
            return assembled, on_queue

    assembled, on_queue = run(scenario())
    assert assembled.complete and assembled.text() == WEATHER_ANSWER
    assert on_redis[-1]["type"] == "assistantReply", "the reply is the stream's last entry"
    assert on_redis[-1]["deltaCount"] == len(deltas_of(on_redis)) > 0
    assert [e["type"] for e in on_queue] == ["assistantReply"], "deltas only to Redis"
    assert on_queue[0]["content"] == WEATHER_ANSWER


def test_a_post_runs_its_turn_on_another_api_with_the_whole_history(storage: StorageEnv) -> None:
    chat_id = f"switch-{storage.suffix}"

    async def scenario() -> tuple[list[Any], ChatRows]:
        async with FakeOpenAI(background_delay=0.05) as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo")
            )
            await create_chat(storage, settings, create_body(chat_id, storage.table, api="chat"))
            await storage.send(post_body(chat_id, storage.table, "first"))
            await burst(settings)
            await storage.send(post_body(chat_id, storage.table, "second", api="responses"))
            await burst(settings)
            return fake.requests, await chat_rows(storage, chat_id, storage.table)

    requests, rows = run(scenario())
    assert [r.endpoint for r in requests if r.endpoint in ("chat.create", "responses.create")] == [
        "chat.create",
        "responses.create",
    ]
    [created] = [r for r in requests if r.endpoint == "responses.create"]
    said = [item.get("content") for item in created.json["input"]]
    assert said == ["You are a weather bot.", "first", "You said: first", "second"]
    assert [run_row["Api"] for run_row in sorted(rows.runs, key=lambda r: r["Seq"])] == [
        "chat",
        "responses",
    ]
    assert rows.messages[-1]["Content"] == "You said: second"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_assistants_api_answers_with_the_reply_alone(storage: StorageEnv) -> None:
    chat_id = f"legacy-{storage.suffix}"
    replies = f"legacy-replies-{storage.suffix}"

    async def scenario() -> list[dict[str, Any]]:
        async with FakeOpenAI(background_delay=0.05, chunk_delay=CHUNK) as fake:
            settings = storage.settings(**streaming_env(fake.base_url))
            await make_queue(settings, replies)
            await create_chat(
                storage, settings, create_body(chat_id, storage.table, api="assistants")
            )
            await storage.send(post_body(chat_id, storage.table, QUESTION, replyTo=replies,
                                         requestId="ask-a", stream=True))  # fmt: skip
            await burst(settings)
            seen: list[dict[str, Any]] = []
            await read_queue(settings, replies, "ask-a", seen)
            return seen

    [reply] = run(scenario())
    assert reply["type"] == "assistantReply" and reply["content"] == WEATHER_ANSWER
    assert reply["deltaCount"] is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_back_on_the_assistants_api_a_new_thread_carries_the_turns_of_the_others(
    storage: StorageEnv,
) -> None:
    """A turn on another API adds messages the chat's remote thread does not have: the thread
    is forgotten, and the next ``assistants`` turn seeds a new one from the table."""
    chat_id = f"back-{storage.suffix}"

    async def scenario() -> list[Any]:
        async with FakeOpenAI(background_delay=0.05) as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo")
            )
            await create_chat(
                storage, settings, create_body(chat_id, storage.table, api="assistants")
            )
            for text, api in (("one", None), ("two", "chat"), ("three", None)):
                await storage.send(post_body(chat_id, storage.table, text, api=api))
                await burst(settings)
            return fake.requests

    requests = run(scenario())
    threads = [r for r in requests if r.method == "POST" and r.path.endswith("/threads")]
    assert len(threads) == 2
    seeded = [m["content"] for m in threads[1].json.get("messages", [])]
    assert seeded == ["one", "You said: one", "two", "You said: two"]


def test_a_duplicated_step_streams_its_call_once(storage: StorageEnv) -> None:
    """Every runStep is sent twice and both copies run together: the streamed ``chat`` call of
    each step is claimed, so one copy streams it and the other finds the step stored. The
    consumer rule assembles exactly the answer (the copies' deltas would share an attempt and
    interleave otherwise), and the model is called once per step."""
    chat_id = f"stream-twice-{storage.suffix}"
    replies = f"replies-{storage.suffix}"
    seen: list[dict[str, Any]] = []

    async def scenario() -> tuple[DeltaAssembler, int, list[str]]:
        async with FakeOpenAI(chunk_delay=CHUNK) as fake:
            settings = storage.settings(**streaming_env(fake.base_url))
            await create_chat(storage, settings, create_body(chat_id, storage.table))
            await make_queue(settings, replies)
            post = post_body(chat_id, storage.table, QUESTION, replyTo=replies,
                             requestId="ask-twice", stream=True)  # fmt: skip
            await storage.send(post)
            async with open_app(settings, tools=tool_registry()) as app:
                doubled = duplicate_steps(app)
                await asyncio.wait_for(app.worker.run_until_idle(), 120)
            assembled = await read_queue(settings, replies, "ask-twice", seen)
            return assembled, fake.calls(endpoint="chat.create"), doubled

    assembled, model_calls, doubled = run(scenario())
    assert doubled, "the steps were sent twice"
    reply = assembled.reply
    assert reply is not None and reply["status"] == "completed", reply
    assert assembled.complete and assembled.text() == reply["content"] == WEATHER_ANSWER
    assert model_calls == 3, "each of the three model calls once, not once per copy"
