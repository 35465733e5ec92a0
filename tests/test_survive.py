"""What production brings on day one, through real queues on Azurite and the fake model over
real HTTP: a post that arrives before its create, text that is not valid Unicode, replies with
every field, runs whose steps were lost, two producers answering one run at the same instant,
duplicated steps (no tool and no background response twice), servers that reuse tool-call
ids, and turns with more tool calls than a table transaction holds.

The storage outage (the table service stopped and restarted) is in ``test_outage``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError

from handlers.replies import reply_payload
from handlers.services import ChatRef
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    TOOL_LOG_ENV,
    ChatRows,
    ReplyQueue,
    ToolLog,
    chat_rows,
    create_body,
    duplicate_steps,
    eventually,
    lose_steps,
    model_env,
    poison_letters,
    post_body,
    serving,
)
from worker.app import App
from worker.config.redact import Redactor
from worker.runs.model import Run
from worker.store.layout import ChatState
from worker.store.stores import ChatStores
from worker.testing import FakeOpenAI

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookupOrder",
        "description": "Look up an order; answered by the producer.",
        "parameters": {"type": "object", "properties": {"orderId": {"type": "integer"}}},
    },
}
PRICE = {
    "type": "function",
    "function": {
        "name": "priceOrder",
        "description": "Price an order; answered by another service.",
        "parameters": {"type": "object", "properties": {"orderId": {"type": "integer"}}},
    },
}
REPLY_FIELDS = {
    "type",
    "id",
    "runId",
    "requestId",
    "status",
    "content",
    "recentMessages",
    "usage",
    "error",
    "traceparent",
    "deltaCount",
}


@pytest.fixture
def tool_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ToolLog]:
    path = tmp_path / "tools.jsonl"
    monkeypatch.setenv(TOOL_LOG_ENV, str(path))
    yield ToolLog(path)


# --- create/post races --------------------------------------------------------------------------


def test_a_post_sent_before_its_create_waits_for_it(storage: StorageEnv) -> None:
    """A producer sends the post, then the create, back to back (queues keep no order): the
    post waits for its chat, then runs exactly as if it had come after the create."""
    chat_id = f"race-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[dict[str, Any], ChatRows, list[dict[str, Any]]]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo")
            )
            post = post_body(chat_id, storage.table, "hello", replyTo=replies.name, requestId="p1")
            await storage.send(post)
            async with serving(settings):
                # The post is taken first, and finds no chat yet.
                await eventually(
                    lambda: _count_zero(storage, storage.requests_queue, visible_only=True),
                    20,
                    "the post to be taken",
                )
                await storage.send(create_body(chat_id, storage.table, instructions="Be brief."))
                [reply] = await replies.wait_for("assistantReply", 30)
            return (
                reply,
                await chat_rows(storage, chat_id, storage.table),
                await poison_letters(storage),
            )

    reply, rows, letters = run(scenario())
    assert letters == []
    assert reply["status"] == "completed"
    assert rows.roles == ["System", "User", "Assistant"]
    assert [m["Content"] for m in rows.messages[:2]] == ["Be brief.", "hello"]


def test_a_post_whose_chat_never_comes_is_dead_lettered_after_the_grace(
    storage: StorageEnv,
) -> None:
    """Retried with short delays, then dead-lettered with a reason that says it waited."""
    chat_id = f"nobody-{storage.suffix}"

    async def scenario() -> list[dict[str, Any]]:
        settings = storage.settings(WORKER_CREATE_GRACE="3")
        await storage.send(post_body(chat_id, storage.table, "anyone?", requestId="lonely"))
        async with serving(settings):
            return await eventually(
                lambda: poison_letters(storage, storage.requests_poison), 30, "the dead letter"
            )

    [letter] = run(scenario())
    info = letter["deadLetter"]
    assert info["errorType"] == "UnknownAssistant"
    assert "does not exist" in info["reason"] and "waited" in info["reason"]
    assert info["dequeueCount"] >= 2, "it was retried before it was given up"
    assert info["requestId"] == "lonely"


# --- bad text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["plain", "base64"])
def test_a_lone_surrogate_is_refused_on_the_first_attempt(
    storage: StorageEnv, encoding: str
) -> None:
    """Half an emoji (valid JSON, not valid Unicode) is dead-lettered at once, naming the
    field; the dead letter keeps the original body."""
    chat_id = f"emoji-{storage.suffix}"
    fields = f'"id": "{chat_id}", "collectionName": "{storage.table}"'
    text = "{" + fields + ', "userMessage": "half an emoji \\ud83d"}'
    body = text if encoding == "plain" else base64.b64encode(text.encode()).decode()

    async def scenario() -> list[dict[str, Any]]:
        await storage.send(body)
        async with serving(storage.settings()):
            return await eventually(
                lambda: poison_letters(storage, storage.requests_poison), 20, "the dead letter"
            )

    [letter] = run(scenario())
    info = letter["deadLetter"]
    assert info["dequeueCount"] == 1
    assert "userMessage" in info["reason"] and "Unicode" in info["reason"]
    assert "\\ud83d" in json.dumps(letter["message"])


# --- runs that lost their steps -----------------------------------------------------------------


def test_a_run_whose_steps_were_lost_expires_and_the_next_post_runs(storage: StorageEnv) -> None:
    """The first worker loses the run's steps (as if they were lost or dead-lettered). At its
    deadline the run ends expired with a reply, and the post queued
    behind it runs: no later post is needed to notice."""
    chat_id = f"lost-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[list[dict[str, Any]], ChatRows]:
        async with FakeOpenAI() as fake:
            env = model_env(
                fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo", WORKER_RUN_TIMEOUT="3"
            )
            settings = storage.settings(**env)
            await storage.send(create_body(chat_id, storage.table))
            first = post_body(chat_id, storage.table, "one", replyTo=replies.name, requestId="p1")
            second = post_body(chat_id, storage.table, "two", replyTo=replies.name, requestId="p2")
            async with serving(settings) as app:
                lose_steps(app)
                await storage.send(first)
                await eventually(lambda: _started(app), 20, "the first run to start")
                await storage.send(second)
                await eventually(
                    lambda: _count_zero(storage, storage.requests_queue), 20, "the second post"
                )
            async with serving(settings):
                events = await replies.wait_for("assistantReply", 40, count=2)
            return events, await chat_rows(storage, chat_id, storage.table)

    events, rows = run(scenario())
    by_request = {event["requestId"]: event for event in events}
    assert by_request["p1"]["status"] == "expired"
    assert "did not finish" in by_request["p1"]["error"]
    assert by_request["p2"]["status"] == "completed"
    assert rows.roles == ["System", "User", "User", "Assistant"]
    assert [run_row["Status"] for run_row in rows.runs] == ["expired", "completed"]


def test_a_run_whose_row_vanished_frees_its_chat(storage: StorageEnv) -> None:
    """A reset that failed half-way can leave the chat naming an active run whose row is gone:
    at that run's deadline the chat is freed and its queued post runs."""
    chat_id = f"vanished-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> list[dict[str, Any]]:
        async with FakeOpenAI() as fake:
            env = model_env(
                fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo", WORKER_RUN_TIMEOUT="3"
            )
            settings = storage.settings(**env)
            await storage.send(create_body(chat_id, storage.table))
            async with serving(settings) as app:
                lose_steps(app)
                await storage.send(post_body(chat_id, storage.table, "one", requestId="p1"))
                await eventually(lambda: _started(app), 20, "the first run to start")
                second = post_body(chat_id, storage.table, "two", replyTo=replies.name)
                await storage.send(second)
                await eventually(
                    lambda: _count_zero(storage, storage.requests_queue), 20, "the second post"
                )
            rows = await chat_rows(storage, chat_id, storage.table)
            first_run = rows.runs[0]["RowKey"]
            async with storage.tables() as service:
                await service.get_table_client(storage.table).delete_entity(chat_id, first_run)
            async with serving(settings):
                return await replies.wait_for("assistantReply", 40)

    [reply] = run(scenario())
    assert reply["status"] == "completed"


# --- replies ------------------------------------------------------------------------------------


def test_every_reply_field_is_present(storage: StorageEnv) -> None:
    """A completed run's reply names every field, ``null`` where it has no value."""
    chat_id = f"fields-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> dict[str, Any]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo")
            )
            await storage.send(create_body(chat_id, storage.table))
            await storage.send(post_body(chat_id, storage.table, "hi", replyTo=replies.name))
            async with serving(settings):
                [reply] = await replies.wait_for("assistantReply", 30)
            return reply

    reply = run(scenario())
    assert set(reply) == REPLY_FIELDS
    assert reply["error"] is None
    assert reply["status"] == "completed"
    assert reply["deltaCount"] is None, "a run that did not stream"


# --- external tools from several services -------------------------------------------------------


def test_two_services_answer_their_own_calls_at_the_same_instant(storage: StorageEnv) -> None:
    """Each service submits the output of its own call, both at once; a third sends one of
    them again: every output counts once, nothing is refused, and the run completes."""
    chat_id = f"two-services-{storage.suffix}"
    model = f"orders-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[dict[str, Any], ChatRows, list[dict[str, Any]]]:
        async with FakeOpenAI() as fake:
            fake.script(
                model,
                [
                    {
                        "tool_calls": [
                            {"name": "lookupOrder", "arguments": {"orderId": 1}},
                            {"name": "priceOrder", "arguments": {"orderId": 1}},
                        ]
                    },
                    {"content": "Shipped, and it cost 3 euros."},
                ],
            )
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model)
            )
            create = create_body(chat_id, storage.table, tools=[LOOKUP, PRICE])
            await storage.send(create)
            async with serving(settings):
                await storage.send(
                    post_body(chat_id, storage.table, "my order?", replyTo=replies.name)
                )
                [required] = await replies.wait_for("toolCallsRequired", 30)
                calls = {call["name"]: call["id"] for call in required["toolCalls"]}

                def submit(name: str, output: str, request_id: str) -> dict[str, Any]:
                    return {
                        "type": "submitToolOutputs",
                        "id": chat_id,
                        "collectionName": storage.table,
                        "runId": required["runId"],
                        "requestId": request_id,
                        "toolOutputs": [{"toolCallId": calls[name], "output": output}],
                    }

                await asyncio.gather(
                    storage.send(submit("lookupOrder", "shipped", "svc-a")),
                    storage.send(submit("priceOrder", "3 euros", "svc-b")),
                    storage.send(submit("lookupOrder", "shipped", "svc-a-again")),
                )
                [reply] = await replies.wait_for("assistantReply", 30)
            return (
                reply,
                await chat_rows(storage, chat_id, storage.table),
                await poison_letters(storage),
            )

    reply, rows, letters = run(scenario())
    assert letters == []
    assert reply["status"] == "completed"
    assert rows.roles == ["System", "User", "Assistant", "Tool", "Tool", "Assistant"]
    assert sorted(m["Content"] for m in rows.messages[3:5]) == ["3 euros", "shipped"]


# --- duplicated steps ---------------------------------------------------------------------------


def test_a_duplicated_tools_step_runs_each_tool_once(
    storage: StorageEnv, tool_log: ToolLog
) -> None:
    """Every step message is sent twice, so two copies of each tools step run at the same
    time: each call is claimed before it runs, and runs exactly once."""
    chat_id = f"dup-tools-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    model = f"slow-notes-{storage.suffix}"

    async def scenario() -> tuple[dict[str, Any], list[str]]:
        async with FakeOpenAI() as fake:
            fake.script(
                model,
                [
                    {
                        "tool_calls": [
                            {"name": "slow_note", "arguments": {"label": "a", "seconds": 0.5}},
                            {"name": "slow_note", "arguments": {"label": "b", "seconds": 0.5}},
                        ]
                    },
                    {"content": "noted"},
                ],
            )
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model)
            )
            await storage.send(create_body(chat_id, storage.table, tools=["slow_note"]))
            async with serving(settings) as app:
                doubled = duplicate_steps(app)
                await storage.send(post_body(chat_id, storage.table, "note", replyTo=replies.name))
                [reply] = await replies.wait_for("assistantReply", 40)
            return reply, doubled

    reply, doubled = run(scenario())
    assert reply["status"] == "completed"
    assert doubled, "the steps were duplicated"
    assert tool_log.count("start") == Counter({("slow_note", "a"): 1, ("slow_note", "b"): 1})


def test_a_duplicated_model_step_creates_one_background_response(storage: StorageEnv) -> None:
    """On the responses API a redelivered or duplicated step must not start a second
    background response: each step's creation is claimed, and a copy follows the response the
    first one created."""
    chat_id = f"dup-responses-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[dict[str, Any], list[Any]]:
        async with FakeOpenAI(background_delay=0.3) as fake:
            settings = storage.settings(**model_env(fake.base_url))
            await storage.send(create_body(chat_id, storage.table, api="responses"))
            async with serving(settings) as app:
                duplicate_steps(app)
                question = "What's the weather like right now in my favorite city?"
                await storage.send(
                    post_body(chat_id, storage.table, question, replyTo=replies.name)
                )
                [reply] = await replies.wait_for("assistantReply", 60)
            return reply, fake.requests

    reply, requests = run(scenario())
    assert reply["status"] == "completed"
    creates = [r for r in requests if r.endpoint == "responses.create" and r.status == 200]
    # The weather bot makes three model calls: three responses, not six.
    assert len(creates) == 3, [r.json.get("previous_response_id") for r in creates]


# --- model servers that reuse ids, and wide turns -----------------------------------------------


def test_tool_calls_with_one_id_each_keep_their_own_output(
    storage: StorageEnv, tool_log: ToolLog
) -> None:
    """An OpenAI-compatible server that gives two calls of a turn the same id: each call
    still runs, and each output is stored (none overwrites the other)."""
    chat_id = f"same-ids-{storage.suffix}"
    model = f"same-ids-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[dict[str, Any], ChatRows]:
        async with FakeOpenAI() as fake:
            fake.script(
                model,
                [
                    {
                        "tool_calls": [
                            {"id": "call_0", "name": "note", "arguments": {"label": "a"}},
                            {"id": "call_0", "name": "note", "arguments": {"label": "b"}},
                        ]
                    },
                    {"content": "both noted"},
                ],
            )
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model)
            )
            await storage.send(create_body(chat_id, storage.table, tools=["note"]))
            async with serving(settings):
                await storage.send(post_body(chat_id, storage.table, "note", replyTo=replies.name))
                [reply] = await replies.wait_for("assistantReply", 30)
            return reply, await chat_rows(storage, chat_id, storage.table)

    reply, rows = run(scenario())
    assert reply["status"] == "completed"
    tools = [m for m in rows.messages if m["Role"] == "Tool"]
    assert len(tools) == 2
    assert len({m["Name"] for m in tools}) == 2, "each output answers its own call id"
    assert tool_log.count() == Counter({("note", "a"): 1, ("note", "b"): 1})


def test_a_turn_with_more_tool_calls_than_a_transaction_holds(
    storage: StorageEnv, tool_log: ToolLog
) -> None:
    """120 parallel tool calls in one turn: every result is stored and the run completes."""
    chat_id = f"wide-{storage.suffix}"
    model = f"wide-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    calls = [{"name": "note", "arguments": {"label": f"n{n}"}} for n in range(120)]

    async def scenario() -> tuple[dict[str, Any], ChatRows]:
        async with FakeOpenAI() as fake:
            fake.script(model, [{"tool_calls": calls}, {"content": "all noted"}])
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model)
            )
            await storage.send(create_body(chat_id, storage.table, tools=["note"]))
            async with serving(settings):
                await storage.send(post_body(chat_id, storage.table, "note", replyTo=replies.name))
                [reply] = await replies.wait_for("assistantReply", 60)
            return reply, await chat_rows(storage, chat_id, storage.table)

    reply, rows = run(scenario())
    assert reply["status"] == "completed", reply["error"]
    assert rows.roles == ["System", "User", "Assistant", *["Tool"] * 120, "Assistant"]
    assert len(tool_log.count()) == 120


# --- helpers ------------------------------------------------------------------------------------


async def _count_zero(storage: StorageEnv, queue: str, *, visible_only: bool = False) -> bool:
    if visible_only:
        async with storage.queues() as service:
            peeked = await service.get_queue_client(queue).peek_messages(max_messages=1)
            return not peeked
    return await storage.count(queue) == 0


async def _started(app: App) -> bool:
    return app.worker.stats["completed"] >= 2  # the create and the post


# --- secrets in run errors ----------------------------------------------------------------------


def test_run_errors_reach_replies_redacted(storage: StorageEnv) -> None:
    """A run's error text (a model or storage error, which may quote a key or a connection
    string) goes through the redactor before it leaves the worker in a reply."""
    secret = "sk-live-0123456789abcdef"
    run_row = Run(
        run_id="run_000001_0000000001",
        seq=1,
        status="failed",
        request_id="p1",
        user_message="hi",
        api="chat",
        model="m",
        created_at=datetime.now(UTC),
        expires_at=datetime.now(UTC),
        error=f"the run failed: model said: bad key {secret}; AccountKey=abc123def456==",
    )

    async def scenario() -> dict[str, Any]:
        stores = ChatStores(storage.settings())
        try:
            store = await stores.get("AzureWebJobsStorage", storage.table, create=True)
            chat = ChatRef("secret-chat", "AzureWebJobsStorage", storage.table)
            now = datetime.now(UTC)
            state = ChatState("secret-chat", True, now, now, 0, 0, {})
            return await reply_payload(
                store, chat, run_row, "none", Redactor([secret]), state=state
            )
        finally:
            await stores.close()

    reply = run(scenario())
    assert secret not in json.dumps(reply)
    assert "abc123def456" not in json.dumps(reply)
    assert "the run failed" in reply["error"]


# --- remote work the worker abandons ------------------------------------------------------------


def test_abandoned_background_responses_are_cancelled(storage: StorageEnv) -> None:
    """A run that expires while its background response is still working, and a run whose
    chat is deleted meanwhile, both cancel their response at the model: nothing keeps
    burning tokens for a run the worker gave up."""
    expiring, deleted = f"expire-{storage.suffix}", f"delete-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[list[dict[str, Any]], list[str]]:
        async with FakeOpenAI(background_delay=10_000) as fake:
            env = model_env(fake.base_url, WORKER_RUN_TIMEOUT="3", WORKER_POLL_BACKOFF="1")
            settings = storage.settings(**env)
            for chat_id in (expiring, deleted):
                await storage.send(create_body(chat_id, storage.table, api="responses"))
            async with serving(settings):
                for chat_id in (expiring, deleted):
                    await storage.send(
                        post_body(chat_id, storage.table, "slow", replyTo=replies.name)
                    )
                await eventually(
                    lambda: _created_responses(fake, 2), 20, "both background responses"
                )
                delete = {"type": "assistantDelete", "id": deleted, "collectionName": storage.table}
                await storage.send(delete)
                events = await replies.wait_for("assistantReply", 30, count=2)
            cancels = [r.path for r in fake.requests if r.path.endswith("/cancel")]
            return events, cancels

    events, cancels = run(scenario())
    assert sorted(e["status"] for e in events) == ["cancelled", "expired"]
    assert len(cancels) == 2, cancels


async def _created_responses(fake: FakeOpenAI, count: int) -> bool:
    return len([r for r in fake.requests if r.endpoint == "responses.create"]) >= count


def test_a_submit_whose_answer_was_lost_still_resumes_the_run(storage: StorageEnv) -> None:
    """The submit's transaction lands, then the connection drops before its answer (as
    the SDK reports it): the redelivered submit finds its record and sends the step that
    resumes the run, once; the run completes and nothing is dead-lettered."""
    chat_id = f"lost-answer-{storage.suffix}"
    model = f"orders-lost-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        async with FakeOpenAI() as fake:
            fake.script(
                model,
                [
                    {"tool_calls": [{"name": "lookupOrder", "arguments": {"orderId": 7}}]},
                    {"content": "Order 7 shipped."},
                ],
            )
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model)
            )
            await storage.send(create_body(chat_id, storage.table, tools=[LOOKUP]))
            async with serving(settings) as app:
                store = await app.stores.get("AzureWebJobsStorage", storage.table)
                lost: list[bool] = []
                submit = store.submit

                async def answer_lost(operations: list[Any], action: str) -> list[Any]:
                    result = await submit(operations, action)
                    is_submit = any(op[1].get("Type") == "submitToolOutputs" for op in operations)
                    if is_submit and not lost:
                        lost.append(True)
                        raise ServiceResponseError("connection reset after the write")
                    return result

                store.submit = answer_lost  # type: ignore[method-assign]
                await storage.send(
                    post_body(chat_id, storage.table, "order?", replyTo=replies.name)
                )
                [required] = await replies.wait_for("toolCallsRequired", 30)
                [call] = required["toolCalls"]
                await storage.send(
                    {
                        "type": "submitToolOutputs",
                        "id": chat_id,
                        "collectionName": storage.table,
                        "runId": required["runId"],
                        "requestId": "svc-1",
                        "toolOutputs": [{"toolCallId": call["id"], "output": "shipped"}],
                    }
                )
                [reply] = await replies.wait_for("assistantReply", 30)
            calls = [r for r in fake.requests if r.endpoint == "chat.create" and r.status == 200]
            return reply, await poison_letters(storage), len(calls)

    reply, letters, model_calls = run(scenario())
    assert letters == []
    assert reply["status"] == "completed"
    assert reply["content"] == "Order 7 shipped."
    assert model_calls == 2, "the resumed step ran once"
