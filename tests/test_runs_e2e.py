"""Runs end to end: posts through real queues on Azurite, the fake model over real HTTP, tools,
and the chat in Table Storage, by the real worker (in-process; see ``test_runs_processes`` for
worker processes).

Each test is bounded; waits poll a queue or a table instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError

from tests.support.env import StorageEnv, run
from tests.support.runs import (
    TOOL_LOG_ENV,
    WEATHER_ANSWER,
    ChatRows,
    ReplyQueue,
    SentMessage,
    ToolLog,
    big_text,
    burst,
    chat_rows,
    create_body,
    decode,
    eventually,
    full_content,
    history_problems,
    model_env,
    poison_letters,
    post_body,
    query_state,
    record_sends,
    serving,
    tool_calls_of,
    tool_registry,
)
from worker.app import open_app
from worker.cli.main import main as cli
from worker.config.settings import Settings
from worker.runs.machine import CAP_MESSAGE
from worker.testing import FakeOpenAI, RecordedRequest

QUESTION = "What's the weather like right now in my favorite city?"
APIS = [
    "chat",
    "responses",
    pytest.param("assistants", marks=pytest.mark.filterwarnings("ignore::DeprecationWarning")),
]
PENDING_APIS = [
    "responses",
    pytest.param("assistants", marks=pytest.mark.filterwarnings("ignore::DeprecationWarning")),
]
TOOL_CALL_KEYS = {"id", "functionName", "functionArguments", "kind"}


@pytest.fixture
def tool_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ToolLog]:
    """The execution log of the counted tools of ``tests.support.runs``."""
    path = tmp_path / "tools.jsonl"
    monkeypatch.setenv(TOOL_LOG_ENV, str(path))
    yield ToolLog(path)


def generating(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    """The model calls that made the model answer (not polls), answered or not."""
    wanted = {"chat.create", "responses.create", "runs.create", "runs.submit"}
    return [r for r in requests if r.endpoint in wanted]


def succeeded(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in requests if r.status is not None and r.status < 400]


async def create_chat(storage: StorageEnv, settings: Settings, body: dict[str, Any]) -> None:
    """Create an assistant and wait until it exists (a post to a missing one is dead-lettered)."""
    await storage.send(body)
    await burst(settings)
    rows = await storage.partition(body["id"], body.get("collectionName", "ChatState"))
    assert rows.get("state", {}).get("Exists") is True, rows


# --- 1. the weather bot on each API -----------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_weather_bot_on_each_api(
    storage: StorageEnv,
    tool_log: ToolLog,
    api: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The Assistants docs' weather bot: the favourite city, then nickname and weather as two
    parallel calls, then the answer; stored as the extension stores a chat."""
    chat_id = f"weather-{api}-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[list[RecordedRequest], ChatRows]:
        async with FakeOpenAI(background_delay=0.05) as fake:
            settings = storage.settings(**model_env(fake.base_url))
            await create_chat(storage, settings, create_body(chat_id, storage.table, api=api))
            post = post_body(
                chat_id, storage.table, QUESTION, replyTo=replies.name, requestId="ask-1"
            )
            await storage.send(post)
            await burst(settings)
            await replies.drain()
            return fake.requests, await chat_rows(storage, chat_id, storage.table)

    requests, rows = run(scenario())

    [reply] = replies.events
    assert reply["type"] == "assistantReply"
    assert (reply["status"], reply["content"]) == ("completed", WEATHER_ANSWER), reply
    assert reply["requestId"] == "ask-1"
    assert [m["role"] for m in reply["recentMessages"]] == [
        "User",
        "Assistant",
        "Tool",
        "Assistant",
        "Tool",
        "Tool",
        "Assistant",
    ]

    expected_roles = ["System", "User", "Assistant", "Tool", "Assistant", "Tool", "Tool"]
    assert rows.roles == [*expected_roles, "Assistant"]
    assert rows.state["TotalMessages"] == 8
    assert rows.state["TotalTokens"] > 0
    first_calls = tool_calls_of(rows.messages[2])
    parallel_calls = tool_calls_of(rows.messages[4])
    for call in first_calls + parallel_calls:
        assert set(call) == TOOL_CALL_KEYS, call
        assert call["kind"] == "Function"
        assert isinstance(call["functionArguments"], str)
    assert [c["functionName"] for c in first_calls] == ["getUserFavoriteCity"]
    assert sorted(c["functionName"] for c in parallel_calls) == [
        "getCityNickname",
        "getWeatherAtLocation",
    ]
    for call in parallel_calls:
        assert json.loads(call["functionArguments"])["location"] == "Seattle, WA"
    # Each call answered by its own Tool row (Name = the call id), right after its message.
    assert rows.messages[3]["Name"] == first_calls[0]["id"]
    assert [m["Name"] for m in rows.messages[5:7]] == [c["id"] for c in parallel_calls]
    outputs = {m["Name"]: m["Content"] for m in rows.messages if m["Role"] == "Tool"}
    by_name = {c["functionName"]: outputs[c["id"]] for c in first_calls + parallel_calls}
    assert by_name == {
        "getUserFavoriteCity": "Seattle, WA",
        "getCityNickname": "The Emerald City",
        "getWeatherAtLocation": "70 degrees and sunny",
    }
    assert rows.messages[-1]["Content"] == WEATHER_ANSWER
    assert history_problems(rows.messages) == []
    assert tool_log.count() == {
        ("getUserFavoriteCity", ""): 1,
        ("getCityNickname", "Seattle, WA"): 1,
        ("getWeatherAtLocation", "Seattle, WA"): 1,
    }
    [only_run] = rows.runs
    assert (only_run["Status"], only_run["Api"]) == ("completed", api)

    # What the model API saw: the API the assistant was created with, outputs submitted.
    calls = generating(requests)
    assert {r.api for r in calls} == {api}
    answered = succeeded(calls)
    if api == "chat":
        assert len(answered) == 3
        last = answered[-1].json["messages"]
        assert [m["role"] for m in last] == [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "tool",
        ]
        assert len(last[4]["tool_calls"]) == 2, "the two calls came in one model turn"
    elif api == "responses":
        assert [r.endpoint for r in answered] == ["responses.create"] * 3
        assert all(r.json.get("background") is True for r in answered)
        assert all(r.json.get("store") is True for r in answered)
        for follow_up in answered[1:]:
            assert follow_up.json.get("previous_response_id")
            kinds = [item.get("type") for item in follow_up.json["input"]]
            assert set(kinds) == {"function_call_output"}, follow_up.json["input"]
        assert len(answered[2].json["input"]) == 2
    else:
        assert [r.endpoint for r in answered] == ["runs.create", "runs.submit", "runs.submit"]
        assert len(answered[2].json["tool_outputs"]) == 2

    # The query (`assistant-worker state`) shows the same chat, as the extension's AssistantState.
    for key, value in storage.env().items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert cli(["state", chat_id, "--collection", storage.table]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["exists"] is True
    assert state["totalMessages"] == 8
    assert [m["role"] for m in state["recentMessages"]] == [*expected_roles, "Assistant"]
    assert state["recentMessages"][4]["toolCalls"] == rows.messages[4]["ToolCalls"]
    assert state["recentMessages"][-1]["content"] == WEATHER_ANSWER


# --- 2. the extension's own post payload ------------------------------------------------------


def test_extension_post_payload(storage: StorageEnv, tool_log: ToolLog) -> None:
    """`{"id", "userMessage", "chatModel"}` with no type, into the extension's default table,
    after the extension's own create payload: a post, answered by the model it names."""
    chat_id = f"ext-post-{storage.suffix}"

    async def scenario() -> tuple[list[RecordedRequest], ChatRows, str]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(**model_env(fake.base_url))
            await create_chat(storage, settings, {"id": chat_id, "instructions": "Answer briefly."})
            message_id = await storage.send(
                {"id": chat_id, "userMessage": "Hello there", "chatModel": "gpt-4o-mini"}
            )
            app = await burst(settings)
            assert app.worker.stats["dead_lettered"] == 0
            return fake.requests, await chat_rows(storage, chat_id, "ChatState"), message_id

    requests, rows, message_id = run(scenario())
    [call] = generating(requests)
    assert call.model == "gpt-4o-mini"
    assert call.json["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello there"},
    ]
    assert rows.roles == ["System", "User", "Assistant"]
    assert rows.messages[2]["Content"] == "You said: Hello there"
    [only_run] = rows.runs
    assert only_run["Status"] == "completed"
    assert only_run["RequestId"] == message_id, "no requestId: the queue message id is used"
    assert tool_log.entries() == []


# --- 3. polling on the backoff schedule, and expiry -------------------------------------------


@pytest.mark.parametrize("api", PENDING_APIS)
def test_pending_run_is_polled_on_the_backoff_schedule_and_expires(
    storage: StorageEnv, tool_log: ToolLog, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background response / remote run still working is polled by runStep messages sent
    with the WORKER_POLL_BACKOFF delays (0.1, 0.2, then 0.2 again), one poll per step, and
    completes; a run that never finishes ends `expired` after WORKER_RUN_TIMEOUT, with a reply.

    The two cases run side by side, each with its own worker, queues and fake server."""
    never_storage = StorageEnv.fresh(storage.azurite)
    done_id, never_id = f"poll-{api}-{storage.suffix}", f"never-{api}-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    schedule = (0.1, 0.2)
    backoff = {"WORKER_POLL_BACKOFF": "0.1,0.2", "WORKER_MAX_POLLING_INTERVAL": "0.1"}
    poll_endpoint = "responses.retrieve" if api == "responses" else "runs.retrieve"

    async def drive(
        env: StorageEnv, settings: Settings, chat_id: str, sent: list[SentMessage]
    ) -> None:
        await create_chat(env, settings, create_body(chat_id, env.table, api=api))
        await env.send(post_body(chat_id, env.table, "Hi", replyTo=replies.name))
        async with open_app(settings, tools=tool_registry()) as app:
            monkeypatch.setattr(app.broker, "send", record_sends(app, sent))
            await asyncio.wait_for(app.worker.run_until_idle(), 60)

    async def scenario() -> tuple[dict[str, Any], ...]:
        async with (
            FakeOpenAI(background_delay=3.0) as fake,
            FakeOpenAI(background_delay=10_000, run_expiry=10_000) as never,
        ):
            done_sent: list[SentMessage] = []
            never_sent: list[SentMessage] = []
            done_settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo-bot", **backoff)
            )
            never_settings = never_storage.settings(
                **model_env(
                    never.base_url,
                    CHAT_MODEL_DEPLOYMENT_NAME="echo-bot",
                    # Room for three polls of whole seconds even on a loaded machine.
                    WORKER_RUN_TIMEOUT="5",
                    **backoff,
                )
            )
            await asyncio.gather(
                drive(storage, done_settings, done_id, done_sent),
                drive(never_storage, never_settings, never_id, never_sent),
            )
            await replies.drain()
            polls = {
                "done": fake.calls(endpoint=poll_endpoint),
                "never": never.calls(endpoint=poll_endpoint),
            }
            return (
                {"sent": done_sent, "rows": await chat_rows(storage, done_id, storage.table)},
                {
                    "sent": never_sent,
                    "rows": await chat_rows(never_storage, never_id, never_storage.table),
                },
                polls,
            )

    done, never, polls = run(scenario())

    for name, case, env in (("done", done, storage), ("never", never, never_storage)):
        rows: ChatRows = case["rows"]
        [only_run] = rows.runs
        steps = [
            s
            for s in case["sent"]
            if s.queue == env.runs_queue and s.payload.get("runId") == only_run["RunId"]
        ]
        # The first step is taken at once by the worker that took the post (in-process);
        # each poll after it is a delayed runStep message.
        assert [s.payload["step"] for s in steps] == list(range(1, len(steps) + 1)), steps
        delays = [s.delay for s in steps]
        expected = [schedule[min(i, len(schedule) - 1)] for i in range(len(delays))]
        assert delays == expected, f"{name}: poll delays {delays}"
        assert len(delays) >= 3, f"{name}: the schedule's last delay repeats: {delays}"
        # One poll of the model API per poll step (the last step expires the run without one).
        assert polls[name] == len(delays) - (1 if name == "never" else 0), (name, polls, delays)

    done_run, never_run = done["rows"].runs[0], never["rows"].runs[0]
    assert done_run["Status"] == "completed"
    assert done["rows"].roles == ["System", "User", "Assistant"]
    assert done["rows"].messages[-1]["Content"] == "You said: Hi"
    assert never_run["Status"] == "expired"
    assert "5 s" in never_run["Error"]
    assert history_problems(never["rows"].messages) == []

    by_run = {e["runId"]: e for e in replies.events if e["type"] == "assistantReply"}
    assert by_run[done_run["RunId"]]["status"] == "completed"
    assert by_run[done_run["RunId"]]["content"] == "You said: Hi"
    assert by_run[never_run["RunId"]]["status"] == "expired"
    assert "5 s" in by_run[never_run["RunId"]]["error"]


# --- 5. a 429 storm ---------------------------------------------------------------------------


def test_429_storm(storage: StorageEnv, tool_log: ToolLog) -> None:
    """Half of the model calls answered 429 (Retry-After) for a while, and one chat whose model
    is refused four times in a row (more than the SDK's own retry, so the worker re-sends the
    step with the delay): every run completes, nothing is dead-lettered, no tool runs twice."""
    chats = [f"storm-{n}-{storage.suffix}" for n in range(6)]
    hard = f"storm-hard-{storage.suffix}"

    async def scenario() -> tuple[list[ChatRows], dict[str, int], list[dict[str, Any]]]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(**model_env(fake.base_url))
            await asyncio.gather(
                *(storage.send(create_body(chat_id, storage.table)) for chat_id in chats),
                storage.send(create_body(hard, storage.table, chatModel="weather-hard")),
            )
            await burst(settings)
            hard_rule = fake.fault("429", count=4, model="weather-hard", retry_after=0.2)
            storm = fake.fault("429", every=2, count=12, retry_after=0.2)
            await asyncio.gather(
                *(
                    storage.send(post_body(chat_id, storage.table, QUESTION))
                    for chat_id in [*chats, hard]
                )
            )
            app = await burst(settings)
            assert app.worker.stats["dead_lettered"] == 0
            fired = {"hard": hard_rule.fired, "storm": storm.fired}
            fired["429s"] = sum(1 for r in fake.requests if r.status == 429)
            rows = [await chat_rows(storage, c, storage.table) for c in [*chats, hard]]
            return rows, fired, await poison_letters(storage)

    all_rows, fired, letters = run(scenario())
    assert fired == {"hard": 4, "storm": 12, "429s": 16}
    assert letters == []
    for rows in all_rows:
        [only_run] = rows.runs
        assert only_run["Status"] == "completed", only_run
        assert rows.messages[-1]["Content"] == WEATHER_ANSWER
        assert history_problems(rows.messages) == []
    hard_run = all_rows[-1].runs[0]
    assert hard_run["TransientFailures"] >= 2, "the worker itself re-sent the refused step"
    tool_rows = sum(1 for rows in all_rows for m in rows.messages if m["Role"] == "Tool")
    assert tool_rows == 3 * len(all_rows)
    assert sum(tool_log.count().values()) == tool_rows, "each tool call executed exactly once"
    assert tool_log.per_tool() == {
        "getUserFavoriteCity": len(all_rows),
        "getCityNickname": len(all_rows),
        "getWeatherAtLocation": len(all_rows),
    }


# --- 7. external tools ------------------------------------------------------------------------

LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookupOrder",
        "description": "Find an order by its number (answered by the producer).",
        "parameters": {
            "type": "object",
            "properties": {"orderId": {"type": "integer"}},
            "required": ["orderId"],
        },
    },
}


@pytest.mark.parametrize("api", APIS)
def test_external_tools(storage: StorageEnv, tool_log: ToolLog, api: str) -> None:
    """A tool defined in full by the create and registered nowhere: the run waits in
    `requires_action`, `toolCallsRequired` names the calls on replyTo, a producer's
    `submitToolOutputs` resumes the run to its answer; wrong call ids, and outputs for a run
    that no longer waits, are dead-lettered with a reason that names them; the same outputs
    sent again are ignored."""
    chat_id = f"ext-tools-{api}-{storage.suffix}"
    model = f"orders-{api}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> dict[str, Any]:
        async with FakeOpenAI(background_delay=0.05) as fake:
            fake.script(
                model,
                [
                    {
                        "tool_calls": [
                            {"name": "lookupOrder", "arguments": {"orderId": 1}},
                            {"name": "lookupOrder", "arguments": {"orderId": 2}},
                        ]
                    },
                    {"content": "Both orders have shipped."},
                ],
            )
            settings = storage.settings(**model_env(fake.base_url))
            await create_chat(
                storage,
                settings,
                create_body(chat_id, storage.table, api=api, chatModel=model, tools=[LOOKUP_ORDER]),
            )
            result: dict[str, Any] = {}
            async with serving(settings) as app:
                await storage.send(
                    post_body(chat_id, storage.table, "Where are my orders?", replyTo=replies.name)
                )
                [required] = await replies.wait_for("toolCallsRequired", 30)
                result["required"] = required
                result["waiting"] = await chat_rows(storage, chat_id, storage.table)
                run_id = required["runId"]
                ids = [call["id"] for call in required["toolCalls"]]
                await storage.send(
                    {
                        "type": "submitToolOutputs",
                        "id": chat_id,
                        "collectionName": storage.table,
                        "runId": run_id,
                        "requestId": "submit-wrong",
                        "toolOutputs": [{"toolCallId": "call_nope", "output": "?"}],
                    }
                )
                result["wrong"] = await eventually(
                    lambda: poison_letters(storage, storage.requests_poison),
                    30,
                    "the wrong submit in the poison queue",
                )
                outputs = [
                    {"toolCallId": call_id, "output": f"order {n}: shipped"}
                    for n, call_id in enumerate(ids, start=1)
                ]
                good = {
                    "type": "submitToolOutputs",
                    "id": chat_id,
                    "collectionName": storage.table,
                    "runId": run_id,
                    "requestId": "submit-good",
                    "toolOutputs": outputs,
                }
                await storage.send(good)
                [reply] = await replies.wait_for("assistantReply", 30)
                result["reply"] = reply
                # The same outputs again, from another request: ignored, not refused.
                await storage.send({**good, "requestId": "submit-late"})
                stray = [{"toolCallId": "call_other", "output": "?"}]
                await storage.send({**good, "requestId": "submit-stray", "toolOutputs": stray})
                letters = await eventually(
                    lambda: _at_least(poison_letters(storage, storage.requests_poison), 2),
                    30,
                    "the stray submit in the poison queue",
                )
                await eventually(
                    lambda: _queue_empty(storage, storage.requests_queue), 30, "the late submit"
                )
                result["late"] = letters
                assert app.worker.stats["dead_lettered"] == 2
            result["rows"] = await chat_rows(storage, chat_id, storage.table)
            result["requests"] = fake.requests
            return result

    result = run(scenario())
    required = result["required"]
    assert required["id"] == chat_id
    assert [c["name"] for c in required["toolCalls"]] == ["lookupOrder", "lookupOrder"]
    assert [json.loads(c["arguments"]) for c in required["toolCalls"]] == [
        {"orderId": 1},
        {"orderId": 2},
    ]
    ids = [c["id"] for c in required["toolCalls"]]
    waiting: ChatRows = result["waiting"]
    assert waiting.runs[0]["Status"] == "requires_action"
    assert waiting.roles == ["System", "User", "Assistant"]
    assert [c["id"] for c in tool_calls_of(waiting.messages[2])] == ids

    [wrong] = result["wrong"]
    reason = wrong["deadLetter"]["reason"]
    assert "call_nope" in reason, reason
    assert all(call_id in reason for call_id in ids), "the reason names the calls it waits for"
    assert wrong["deadLetter"]["requestId"] == "submit-wrong"

    reply = result["reply"]
    assert (reply["status"], reply["content"]) == ("completed", "Both orders have shipped.")
    late = {letter["deadLetter"]["requestId"]: letter for letter in result["late"]}
    assert "submit-late" not in late, "a repeated output for an answered call is ignored"
    assert "not waiting" in late["submit-stray"]["deadLetter"]["reason"]

    rows: ChatRows = result["rows"]
    assert rows.roles == ["System", "User", "Assistant", "Tool", "Tool", "Assistant"]
    assert [m["Name"] for m in rows.messages[3:5]] == ids
    assert [m["Content"] for m in rows.messages[3:5]] == ["order 1: shipped", "order 2: shipped"]
    assert rows.runs[0]["Status"] == "completed"
    assert tool_log.entries() == [], "an external tool is never run by the worker"

    calls = succeeded(generating(result["requests"]))
    offered = json.dumps(calls[0].json.get("tools"))
    assert "lookupOrder" in offered and "answered by the producer" in offered
    resumed = json.dumps(calls[-1].json)
    assert "order 1: shipped" in resumed and "order 2: shipped" in resumed


async def _queue_empty(storage: StorageEnv, queue: str) -> bool:
    return await storage.count(queue) == 0


async def _at_least(letters: Any, count: int) -> list[dict[str, Any]] | None:
    found: list[dict[str, Any]] = await letters
    return found if len(found) >= count else None


# --- replies and next steps survive a failed send ---------------------------------------------


def test_follow_ups_of_a_step_whose_send_failed_are_sent_again(
    storage: StorageEnv, tool_log: ToolLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step that ends run 1 stores its transition (which starts the queued run 2), then
    fails to send run 2's first step (a dropped connection to the queue service) and is
    retried: the retry finds run 1 ended, and sends run 2's first step and run 1's reply
    again, so run 2 does not stall and no reply is lost."""
    chat_id = f"lost-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, int], ChatRows]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo-bot")
            )
            await create_chat(storage, settings, create_body(chat_id, storage.table))
            # Run 1's model call takes a second, so the second post is queued behind it.
            fake.fault("slow", delay=1, count=1)
            await storage.send(post_body(chat_id, storage.table, "first", replyTo=replies.name))
            await storage.send(post_body(chat_id, storage.table, "second", replyTo=replies.name))
            failed: list[dict[str, Any]] = []
            async with open_app(settings, tools=tool_registry()) as app:
                original = app.broker.send

                async def flaky_send(queue: str, body: str, **options: Any) -> str:
                    payload = decode(body)
                    second_run_starts = payload.get("type") == "runStep" and str(
                        payload.get("runId")
                    ).startswith("run_000002_")
                    if second_run_starts and not failed:
                        failed.append(payload)
                        raise ServiceResponseError("connection reset (injected by the test)")
                    return await original(queue, body, **options)

                monkeypatch.setattr(app.broker, "send", flaky_send)
                await asyncio.wait_for(app.worker.run_until_idle(), 60)
                stats = dict(app.worker.stats)
            await replies.drain()
            return failed, stats, await chat_rows(storage, chat_id, storage.table)

    failed, stats, rows = run(scenario())
    assert len(failed) == 1 and failed[0]["step"] == 0, failed
    assert stats.get("retried") == 1
    assert [r["Status"] for r in rows.runs] == ["completed", "completed"], rows.runs
    assert rows.roles == ["System", "User", "Assistant", "User", "Assistant"]
    assert sorted((e["runId"], e["status"]) for e in replies.events) == [
        (r["RunId"], "completed") for r in rows.runs
    ], replies.events


# --- 8. limits --------------------------------------------------------------------------------

TOOL_OUTPUT_CHARS = 200 * 1024
ANSWER_CHARS = 100 * 1024
MARKER = f"[truncated by assistant-worker: showing 65,536 of {TOOL_OUTPUT_CHARS:,} characters]"


def test_large_tool_output_and_answer(storage: StorageEnv, tool_log: ToolLog) -> None:
    """A 200 KiB tool output and a 100 KiB answer are stored whole and read back intact by the
    query; the model is sent the output truncated, with the marker; the run's reply arrives;
    the chat goes on."""
    chat_id = f"big-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    answer = big_text(ANSWER_CHARS, "answer")

    async def scenario() -> dict[str, Any]:
        async with FakeOpenAI() as fake:
            fake.script(
                "big-bot",
                [
                    {
                        "tool_calls": [
                            {"name": "big_output", "arguments": {"size": TOOL_OUTPUT_CHARS}}
                        ]
                    },
                    {"content": answer},
                    {"content": "Still here."},
                ],
            )
            settings = storage.settings(**model_env(fake.base_url))
            await create_chat(
                storage, settings, create_body(chat_id, storage.table, chatModel="big-bot")
            )
            await storage.send(
                post_body(chat_id, storage.table, "Make it big", replyTo=replies.name)
            )
            await storage.send(
                post_body(chat_id, storage.table, "Are you there?", replyTo=replies.name)
            )
            app = await burst(settings)
            await replies.drain()
            return {
                "stats": dict(app.worker.stats),
                "requests": fake.requests,
                "rows": await chat_rows(storage, chat_id, storage.table),
                "state": await query_state(settings, chat_id, storage.table),
                "letters": await poison_letters(storage),
            }

    result = run(scenario())
    rows: ChatRows = result["rows"]
    assert [r["Status"] for r in rows.runs] == ["completed", "completed"], rows.runs
    assert rows.roles == ["System", "User", "Assistant", "Tool", "Assistant", "User", "Assistant"]
    expected_output = big_text(TOOL_OUTPUT_CHARS, "tool")
    assert full_content(rows.messages[3]) == expected_output
    assert full_content(rows.messages[4]) == answer
    state = result["state"]
    assert state.recent_messages[3].content == expected_output
    assert state.recent_messages[4].content == answer
    assert state.recent_messages[6].content == "Still here."
    assert tool_log.count() == {("big_output", str(TOOL_OUTPUT_CHARS)): 1}

    second = succeeded(generating(result["requests"]))[1].json["messages"]
    [sent_output] = [m["content"] for m in second if m["role"] == "tool"]
    assert sent_output.startswith(expected_output[:65536])
    assert sent_output.endswith(MARKER)
    assert len(sent_output) < 65536 + 200
    third = succeeded(generating(result["requests"]))[2].json["messages"]
    assert answer in [m["content"] for m in third], "the whole answer stays in the history"

    assert result["letters"] == [], result["letters"]
    assert result["stats"].get("dead_lettered", 0) == 0
    replies_by_status = [(e["type"], e["status"]) for e in replies.events]
    assert replies_by_status == [("assistantReply", "completed")] * 2, replies.events
    # A queue message holds 64 KiB: the reply may cut the answer, never change it.
    big_reply = next(e for e in replies.events if e["runId"] == rows.runs[0]["RunId"])
    shown = big_reply["content"].split("\n\n[truncated by assistant-worker")[0]
    assert shown and answer.startswith(shown)


def test_tool_round_cap_closes_every_call(storage: StorageEnv, tool_log: ToolLog) -> None:
    """A model that never stops calling tools: 10 rounds run, the 11th call is refused with
    the cap message and the model is asked for a final answer (tool_choice none); it calls
    again, so the run ends `incomplete` — with a result for every call, so the next post works."""
    chat_id = f"cap-{storage.suffix}"
    turns = [{"tool_calls": [{"name": "note", "arguments": {"label": f"r{n}"}}]} for n in range(12)]

    async def scenario() -> tuple[ChatRows, list[RecordedRequest]]:
        async with FakeOpenAI() as fake:
            fake.script("loop-bot", turns)
            settings = storage.settings(**model_env(fake.base_url))
            await create_chat(
                storage, settings, create_body(chat_id, storage.table, chatModel="loop-bot")
            )
            await storage.send(post_body(chat_id, storage.table, "Loop"))
            await storage.send(post_body(chat_id, storage.table, "Then stop"))
            await burst(settings)
            return await chat_rows(storage, chat_id, storage.table), fake.requests

    rows, requests = run(scenario())
    first, second = rows.runs
    assert first["Status"] == "incomplete", first
    assert "10" in first["Error"]
    assert first["ToolRounds"] == 10
    assert second["Status"] == "completed"
    assert history_problems(rows.messages) == []
    calls = [c for m in rows.messages for c in tool_calls_of(m)]
    assert len(calls) == 12
    results = {m["Name"]: m["Content"] for m in rows.messages if m["Role"] == "Tool"}
    assert set(results) == {c["id"] for c in calls}, "every tool call has a result row"
    refusal = CAP_MESSAGE.format(rounds=10)
    assert [results[c["id"]] for c in calls[10:]] == [refusal, refusal]
    assert [results[c["id"]] for c in calls[:10]] == [f"noted r{n}" for n in range(10)]
    assert tool_log.count() == {("note", f"r{n}"): 1 for n in range(10)}
    model_calls = succeeded(generating(requests))
    assert len(model_calls) == 13
    assert model_calls[11].json.get("tool_choice") == "none", "the capped turn asks for text"
    # The posts may be applied in either order: the first run applied consumed the script.
    assert rows.messages[-1]["Content"] == f"You said: {second['UserMessage']}"


# --- 9. a chat written by the extension -------------------------------------------------------


def test_chat_written_by_the_extension_is_continued(storage: StorageEnv, tool_log: ToolLog) -> None:
    """Rows exactly as the Functions extension writes them (no worker properties) are read as
    history, continued by a post, and stay in the extension's layout."""
    chat_id = f"from-ext-{storage.suffix}"
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    table = "ChatState"

    def message(index: int, role: str, content: str) -> dict[str, Any]:
        return {
            "PartitionKey": chat_id,
            "RowKey": f"msg-{index:04X}",
            "Content": content,
            "Role": role,
            "CreatedAt": created,
            "ToolCalls": "",
        }

    extension_rows = [
        {
            "PartitionKey": chat_id,
            "RowKey": "state",
            "Exists": True,
            "CreatedAt": created,
            "LastUpdatedAt": created,
            "TotalMessages": 3,
            "TotalTokens": 42,
        },
        message(1, "System", "You are a weather bot."),
        message(2, "User", "Hi"),
        message(3, "Assistant", "Hello! Ask me about the weather."),
    ]

    async def scenario() -> tuple[ChatRows, list[RecordedRequest], Any]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(**model_env(fake.base_url))
            async with storage.tables() as service:
                client = service.get_table_client(table)
                await service.create_table_if_not_exists(table)
                for entity in extension_rows:
                    await client.create_entity(entity)
            await storage.send({"id": chat_id, "userMessage": QUESTION})
            await burst(settings)
            return (
                await chat_rows(storage, chat_id, table),
                fake.requests,
                await query_state(settings, chat_id, table),
            )

    rows, requests, state = run(scenario())
    first = succeeded(generating(requests))[0].json["messages"]
    assert first[:4] == [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! Ask me about the weather."},
        {"role": "user", "content": QUESTION},
    ]
    keys = [m["RowKey"] for m in rows.messages]
    assert keys == [f"msg-{n:04X}" for n in range(1, 11)], "msg-0004 ... msg-000A"
    assert rows.roles == [
        "System",
        "User",
        "Assistant",
        "User",
        "Assistant",
        "Tool",
        "Assistant",
        "Tool",
        "Tool",
        "Assistant",
    ]
    assert rows.messages[-1]["Content"] == WEATHER_ANSWER
    # The extension's state properties are still there, with the extension's meaning.
    assert rows.state["Exists"] is True
    assert rows.state["TotalMessages"] == 10
    assert rows.state["CreatedAt"] == created
    assert rows.state["LastUpdatedAt"] > created
    assert isinstance(rows.state["TotalTokens"], int)
    # Every message row is readable as the extension reads it.
    for row in rows.messages:
        assert row["Role"] in {"System", "User", "Assistant", "Tool"}
        assert isinstance(row["Content"], str)
        assert isinstance(row["ToolCalls"], str)
        assert isinstance(row["CreatedAt"], datetime)
    for original, row in zip(extension_rows[1:], rows.messages[:3], strict=True):
        assert {k: row[k] for k in original} == original
    assert history_problems(rows.messages) == []
    assert state.total_messages == 10
    assert [m.role for m in state.recent_messages] == rows.roles
    assert sum(tool_log.count().values()) == 3
