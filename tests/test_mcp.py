"""MCP tools end to end (SPEC §5.5): an assistant whose ``mcpServers`` name a real MCP server
(``tests/support/mcp_server.py``: the same SDK, Streamable HTTP, a process on a free port), the
fake model asked to call its tools, through the real queues on Azurite and a real worker
(in-process, or processes where a kill or the logs matter).

Every wait is bounded; waits poll a queue, a table or a log instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import handlers.step
from tests.support.env import StorageEnv, run
from tests.support.mcp_server import FORECAST, McpServerProcess
from tests.support.processes import WorkerProcess, wait_until
from tests.support.runs import (
    ChatRows,
    ReplyQueue,
    burst,
    chat_rows,
    create_body,
    eventually,
    history_problems,
    model_env,
    poison_letters,
    post_body,
    runs_finished,
    serving,
    tool_registry,
)
from tests.support.scrape import http_settings, scrape, value
from worker.app import open_app
from worker.config.settings import Settings
from worker.observability.tracing import Tracing
from worker.testing import FakeOpenAI, RecordedRequest

TOKEN = "mcp-bearer-token-0123456789"
WEATHER = FORECAST["forecast"]
APIS = [
    "chat",
    "responses",
    pytest.param("assistants", marks=pytest.mark.filterwarnings("ignore::DeprecationWarning")),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpServerProcess]:
    """One server for the tests that leave it running (with a token, as in production)."""
    with McpServerProcess(tmp_path_factory.mktemp("mcp"), token=TOKEN) as process:
        yield process


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def offered(requests: list[RecordedRequest]) -> list[str]:
    """The function names the model was offered in its first request (Chat Completions,
    Responses and Assistants shapes alike)."""
    for request in requests:
        tools = (request.json or {}).get("tools") if isinstance(request.json, dict) else None
        if tools:
            return [str(t.get("name") or t.get("function", {}).get("name")) for t in tools]
    return []


def offered_schema(requests: list[RecordedRequest], name: str) -> dict[str, Any]:
    for request in requests:
        for tool in (request.json or {}).get("tools") or []:
            function = tool.get("function", tool)
            if function.get("name") == name:
                parameters: dict[str, Any] = function["parameters"]
                return parameters
    raise AssertionError(f"{name} was not offered")


def tool_outputs(rows: ChatRows) -> list[str]:
    return [str(m["Content"]) for m in rows.messages if m["Role"] == "Tool"]


async def ask(
    storage: StorageEnv,
    settings: Settings,
    chat_id: str,
    text: str,
    replies: ReplyQueue,
    **create: Any,
) -> ChatRows:
    """Create the assistant, post, run the worker until idle; the chat's rows."""
    await storage.send(create_body(chat_id, storage.table, **create))
    await burst(settings)
    await storage.send(post_body(chat_id, storage.table, text, replyTo=replies.name))
    await burst(settings)
    await replies.drain()
    return await chat_rows(storage, chat_id, storage.table)


# --- the tools of a server, on each API -------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_an_assistant_calls_an_mcp_servers_tool(
    storage: StorageEnv, server: McpServerProcess, api: str
) -> None:
    """The server's tools are offered as ``weather__*`` with the server's schema, beside the
    registered tools; the model's call runs once on the server; its result is stored and read
    by the model; the run completes."""
    chat_id = f"mcp-{api}-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    model = f"mcp-bot-{api}"

    async def scenario() -> tuple[list[RecordedRequest], ChatRows]:
        async with FakeOpenAI(background_delay=0.05) as fake:
            fake.script(
                model,
                [
                    {"tool_calls": [call("weather__get_weather", city=f"Seattle {api}")]},
                    {"content": "It is sunny."},
                ],
            )
            settings = storage.settings(**model_env(fake.base_url), **server.env())
            rows = await ask(
                storage, settings, chat_id, "Weather?", replies,
                api=api, chatModel=model, mcpServers=["weather"],
            )  # fmt: skip
            return fake.requests, rows

    requests, rows = run(scenario())
    [reply] = replies.events
    assert (reply["status"], reply["content"]) == ("completed", "It is sunny."), reply
    assert rows.roles == ["System", "User", "Assistant", "Tool", "Assistant"]
    assert history_problems(rows.messages) == []
    [output] = tool_outputs(rows)
    assert json.loads(output) == {"city": f"Seattle {api}", "forecast": WEATHER}
    assert server.executions("get_weather").count(f"Seattle {api}") == 1
    names = offered(requests)
    assert {"weather__get_weather", "weather__send_email", "note"} <= set(names), names
    assert offered_schema(requests, "weather__get_weather")["required"] == ["city"]


def test_allowed_tools_limit_what_is_offered_and_run(
    storage: StorageEnv, server: McpServerProcess
) -> None:
    """``allowedTools``: only those are offered; a call of another tool of the server (a model
    that guesses) is answered as unknown and never reaches the server."""
    chat_id = f"mcp-allowed-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    subject = f"never-{storage.suffix}"

    async def scenario() -> tuple[list[RecordedRequest], ChatRows]:
        async with FakeOpenAI() as fake:
            fake.script(
                "allowed-bot",
                [
                    {"tool_calls": [call("weather__send_email", to="a@b.c", subject=subject)]},
                    {"content": "Could not."},
                ],
            )
            settings = storage.settings(**model_env(fake.base_url), **server.env())
            rows = await ask(
                storage, settings, chat_id, "Mail them", replies, chatModel="allowed-bot",
                tools=[], mcpServers=[{"name": "weather", "allowedTools": ["get_weather"]}],
            )  # fmt: skip
            return fake.requests, rows

    requests, rows = run(scenario())
    assert offered(requests) == ["weather__get_weather"]
    [output] = tool_outputs(rows)
    assert output.startswith("error: unknown tool 'weather__send_email'"), output
    assert "weather__get_weather" in output
    assert subject not in server.executions("send_email", "start")
    assert replies.events[-1]["status"] == "completed"


def test_failures_are_tool_errors_the_model_reads(
    storage: StorageEnv, server: McpServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round: a tool that answers ``isError``, one slower than the timeout, arguments the
    server's schema refuses (never sent), and a good call. Each gets its result, the failures
    an ``error: ...`` the model reads; the run completes."""
    monkeypatch.setattr(handlers.step, "TOOL_TIMEOUT", 1.0)
    chat_id = f"mcp-fail-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    label = f"slow-{storage.suffix}"

    async def scenario() -> ChatRows:
        async with FakeOpenAI() as fake:
            fake.script(
                "fail-bot",
                [
                    {
                        "tool_calls": [
                            call("weather__broken"),
                            call("weather__slow", seconds=30, label=label),
                            call("weather__get_weather", city=5),
                            call("weather__get_weather", city=f"Oslo {storage.suffix}"),
                        ]
                    },
                    {"content": "Partly."},
                ],
            )
            settings = storage.settings(**model_env(fake.base_url), **server.env())
            return await ask(
                storage, settings, chat_id, "Try", replies,
                chatModel="fail-bot", mcpServers=["weather"],
            )  # fmt: skip

    rows = run(scenario())
    broken, slow, invalid, good = tool_outputs(rows)
    assert broken.startswith("error: ") and "the weather station is offline" in broken
    assert slow == "error: tool 'weather__slow' timed out after 1 s (MCP server 'weather')"
    assert invalid == (
        "error: invalid arguments for tool 'weather__get_weather': city: 5 is not of type 'string'"
    )
    assert json.loads(good)["forecast"] == WEATHER
    assert [r["Status"] for r in rows.runs] == ["completed"]
    assert replies.events[-1]["content"] == "Partly."
    assert server.executions("slow", "start").count(label) == 1
    assert "5" not in server.executions("get_weather", "start")


def test_a_name_not_allowed_is_refused_at_create(
    storage: StorageEnv, server: McpServerProcess
) -> None:
    """A server name that is not in WORKER_MCP_SERVERS (a URL too) is a permanent error naming
    the setting, on the first attempt: the assistant is not created."""
    names = ["mail", "https://evil.example.com/mcp"]

    async def scenario() -> list[dict[str, Any]]:
        settings = storage.settings(**server.env())
        for n, name in enumerate(names):
            await storage.send(create_body(f"mcp-no-{n}-{storage.suffix}", storage.table,
                                           mcpServers=["weather", name]))  # fmt: skip
        await burst(settings)
        return await poison_letters(storage, storage.requests_poison)

    letters = run(scenario())
    assert len(letters) == 2
    for letter in letters:
        dead = letter["deadLetter"]
        assert dead["errorType"] == "McpServerNotAllowed"
        assert dead["dequeueCount"] == 1
        assert "WORKER_MCP_SERVERS (allowed: weather)" in dead["reason"]
    with pytest.raises(ResourceNotFoundError):  # nothing was ever written: not even the table
        run(storage.partition(f"mcp-no-0-{storage.suffix}", storage.table))


def test_the_session_is_reused_and_reopened_after_the_server_restarts(
    storage: StorageEnv, tmp_path: Path
) -> None:
    """One worker, three posts: two tool rounds on one session (one handshake); the server
    killed: the call is answered unavailable and the run completes; the server back: the next
    call opens a new session and succeeds."""
    process = McpServerProcess(tmp_path, token=TOKEN).start()
    chat_id = f"mcp-restart-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    rounds = {"tool_calls": [call("weather__get_weather", city="Paris")]}

    async def post(text: str, runs: int) -> ChatRows:
        await storage.send(post_body(chat_id, storage.table, text, replyTo=replies.name))
        return await eventually(
            lambda: runs_finished(storage, chat_id, storage.table, runs), 30, f"run {runs}"
        )

    async def scenario() -> ChatRows:
        async with FakeOpenAI() as fake:
            fake.script(
                "restart-bot",
                [rounds, rounds, {"content": "one"}, rounds, {"content": "two"}, rounds,
                 {"content": "three"}],
            )  # fmt: skip
            settings = storage.settings(**model_env(fake.base_url), **process.env())
            await storage.send(create_body(chat_id, storage.table, chatModel="restart-bot",
                                           mcpServers=["weather"]))  # fmt: skip
            await burst(settings)
            async with serving(settings):
                await post("first", 1)
                assert process.sessions_opened() == 1
                process.kill()
                await post("second", 2)
                process.start()
                return await post("third", 3)

    try:
        rows = run(scenario())
    finally:
        process.kill()
    outputs = tool_outputs(rows)
    assert len(outputs) == 4
    assert all(json.loads(o)["city"] == "Paris" for o in outputs[:2])
    assert outputs[2].startswith("error: MCP server 'weather' is unavailable: "), outputs[2]
    assert json.loads(outputs[3])["city"] == "Paris"
    assert [r["Status"] for r in rows.runs] == ["completed"] * 3
    assert process.sessions_opened() == 2
    assert process.executions("get_weather") == ["Paris"] * 3


def test_mcp_calls_are_traced_and_counted(storage: StorageEnv, server: McpServerProcess) -> None:
    """An ``execute_tool weather__get_weather`` span with the server's name, and the call in
    the tool-call metric."""
    chat_id = f"mcp-traced-{storage.suffix}"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario() -> tuple[float, float]:
        async with FakeOpenAI() as fake:
            fake.script(
                "traced-bot",
                [
                    {"tool_calls": [call("weather__get_weather", city="Rome")]},
                    {"tool_calls": [call("weather__broken")]},
                    {"content": "Done."},
                ],
            )
            settings = http_settings(storage, **model_env(fake.base_url), **server.env())
            await storage.send(create_body(chat_id, storage.table, chatModel="traced-bot",
                                           mcpServers=["weather"]))  # fmt: skip
            await storage.send(post_body(chat_id, storage.table, "Rome?"))
            tracing = Tracing.from_provider(provider)
            async with open_app(settings, tools=tool_registry(), tracing=tracing) as app:
                await asyncio.wait_for(app.worker.run_until_idle(), timeout=60)
                samples = await scrape(app)
        name = "assistant_worker_tool_calls_total"
        return (
            value(samples, name, tool="weather__get_weather", outcome="ok"),
            value(samples, name, tool="weather__broken", outcome="error"),
        )

    ok, failed = run(scenario())
    assert (ok, failed) == (1, 1)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name.startswith("execute_tool")}
    assert set(spans) == {"execute_tool weather__get_weather", "execute_tool weather__broken"}
    good = dict(spans["execute_tool weather__get_weather"].attributes or {})
    assert good["mcp.server.name"] == "weather"
    assert good["gen_ai.tool.name"] == "weather__get_weather"
    assert good["gen_ai.tool.type"] == "extension"
    assert not spans["execute_tool weather__broken"].status.is_ok


# --- worker processes ---------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as served:
        yield served


def finished(storage: StorageEnv, chat_id: str) -> ChatRows | None:
    return asyncio.run(runs_finished(storage, chat_id, storage.table, 1))


def create(storage: StorageEnv, process: McpServerProcess, chat_id: str, model: str) -> None:
    """Create the assistant in-process, before the worker process starts."""

    async def go() -> None:
        await storage.send(
            create_body(chat_id, storage.table, chatModel=model, mcpServers=["weather"])
        )
        await burst(storage.settings(**process.env()))

    asyncio.run(go())


@pytest.mark.slow
def test_the_token_is_sent_as_a_bearer_header_and_never_logged(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A worker process configured from the environment: every request it makes to the server
    carries the token (the server refuses any other); the token is nowhere in its log."""
    chat_id = f"mcp-token-{storage.suffix}"
    fake.script(
        "token-bot",
        [{"tool_calls": [call("weather__get_weather", city="Lima")]}, {"content": "ok"}],
    )
    with McpServerProcess(tmp_path, token=TOKEN) as process:
        env = storage.env(**model_env(fake.base_url), **process.env(), WORKER_CONCURRENCY="2")
        create(storage, process, chat_id, "token-bot")
        run(storage.send(post_body(chat_id, storage.table, "Lima?")))
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            rows = wait_until(
                lambda: finished(storage, chat_id), timeout=60, what=lambda: worker.tail()
            )
            log = worker.text()
    assert json.loads(tool_outputs(rows)[0])["city"] == "Lima"
    requests = process.requests()
    assert requests and all(r["authorized"] for r in requests), requests
    assert TOKEN not in log
    assert "mcp.session_opened" in log


@pytest.mark.slow
def test_a_call_interrupted_by_a_kill_reruns_only_if_its_tool_says_it_is_safe(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A worker SIGKILLed while two MCP calls run: the next worker takes them over once their
    claims expired. The read-only tool (annotations) runs again; the other is answered
    interrupted and never sent a second time. The run completes."""
    chat_id = f"mcp-kill-{storage.suffix}"
    fake.script(
        "kill-bot",
        [
            {
                "tool_calls": [
                    # Long enough to be under way when the worker is killed.
                    call("weather__slow", seconds=4, label="mail"),
                    call("weather__slow_lookup", seconds=4, label="look"),
                ]
            },
            {"content": "after the kill"},
        ],
    )
    with McpServerProcess(tmp_path) as process:
        env = storage.env(**model_env(fake.base_url), **process.env(),
                          WORKER_VISIBILITY_TIMEOUT="4")  # fmt: skip
        create(storage, process, chat_id, "kill-bot")
        run(storage.send(post_body(chat_id, storage.table, "Go")))
        with WorkerProcess(env, tmp_path / "first.log") as first:
            wait_until(
                lambda: (
                    process.executions("slow", "start") == ["mail"]
                    and process.executions("slow_lookup", "start") == ["look"]
                ),
                timeout=30,
                what=lambda: f"both calls to start:\n{first.tail()}",
            )
            first.kill()
        with WorkerProcess(env, tmp_path / "second.log") as second:
            rows = wait_until(
                lambda: finished(storage, chat_id), timeout=90, what=lambda: second.tail()
            )
        mail_starts = process.executions("slow", "start")
        look_starts = process.executions("slow_lookup", "start")
    [only_run] = rows.runs
    assert only_run["Status"] == "completed"
    interrupted, looked = tool_outputs(rows)
    assert "interrupted" in interrupted and "weather__slow" in interrupted
    assert looked == "looked up look"
    assert mail_starts == ["mail"], "never sent a second time"
    assert look_starts == ["look", "look"], "the read-only call ran again"
    assert rows.messages[-1]["Content"] == "after the kill"
