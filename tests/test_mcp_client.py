"""The worker as an MCP client (``worker/mcp``) against a real MCP server built with the same SDK
(``tests/support/mcp_server.py``, a process of its own on a free port): the session opened once
and reused, re-opened after the server restarted, the bearer token, tool lists cached, and every
way a call can fail (server down, too slow, ``isError``, arguments the schema refuses).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.types import Tool, ToolAnnotations

from tests.support.env import run
from tests.support.mcp_server import FORECAST, SERVER_NAME, McpServerProcess
from worker.config.settings import McpServerConfig
from worker.mcp.errors import McpUnavailable
from worker.mcp.servers import LIST_TTL, McpServers, describe_tools
from worker.mcp.session import McpSession
from worker.mcp.tools import McpTool, function_name, server_of

TOKEN = "mcp-test-token-1234"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpServerProcess]:
    """One server for the tests that do not stop it."""
    with McpServerProcess(tmp_path_factory.mktemp("mcp"), token=TOKEN) as process:
        yield process


def servers_for(process: McpServerProcess, **options: Any) -> McpServers:
    config = McpServerConfig(SERVER_NAME, process.url, process.token)
    return McpServers({SERVER_NAME: config}, **options)


async def tool(servers: McpServers, name: str) -> McpTool:
    listing = await servers.tools(SERVER_NAME)
    return next(t for t in listing.tools if t.name == name)


# --- pure parts ---------------------------------------------------------------------------------


def test_function_names_are_prefixed_by_the_server() -> None:
    """``{server}__{tool}``; characters OpenAI refuses in a name become ``_``."""
    assert function_name("weather", "get_weather") == "weather__get_weather"
    assert function_name("gh", "issues.create/v2") == "gh__issues_create_v2"
    assert server_of("weather__get_weather") == "weather"
    assert server_of("getWeather") is None
    assert server_of("__x") is None


def test_tools_that_cannot_be_offered_are_skipped_with_the_reason() -> None:
    """A name too long once prefixed, a name that clashes, a schema that is not an object or
    not valid: not offered (OpenAI would refuse the whole model call), said why."""
    obj = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    listed = [
        Tool(name="search", input_schema=obj, annotations=ToolAnnotations(read_only_hint=True)),
        Tool(name="x" * 60, input_schema=obj),
        Tool(name="a.b", input_schema=obj),
        Tool(name="a_b", input_schema=obj),
        Tool(name="scalar", input_schema={"type": "string"}),
        Tool(name="bad", input_schema={"type": "object", "properties": {"q": {"type": 5}}}),
        Tool(name="bare", input_schema={"type": "object"}, annotations=ToolAnnotations()),
    ]
    listing = describe_tools("srv", listed)
    assert [t.function for t in listing.tools] == ["srv__search", "srv__a_b", "srv__bare"]
    assert [s.split(":")[0] for s in listing.skipped] == ["x" * 60, "a_b", "scalar", "bad"]
    search, _, bare = listing.tools
    assert search.rerun_safe and not bare.rerun_safe
    # Offered as a Chat Completions function; an object schema always has its properties.
    assert bare.definition()["function"]["parameters"] == {"type": "object", "properties": {}}
    assert search.check({"q": "rain"}) is None
    assert search.check({"q": 5}) == "q: 5 is not of type 'string'"
    assert search.check({}) == "(arguments): 'q' is a required property"


# --- against the server -------------------------------------------------------------------------


def test_tools_are_listed_with_their_schema_and_annotations(server: McpServerProcess) -> None:
    async def scenario() -> dict[str, McpTool]:
        servers = servers_for(server)
        try:
            listing = await servers.tools(SERVER_NAME)
            return {t.function: t for t in listing.tools}
        finally:
            await servers.close()

    tools = run(scenario())
    assert set(tools) == {
        "weather__get_weather",
        "weather__send_email",
        "weather__slow",
        "weather__slow_lookup",
        "weather__broken",
        "weather__chaos_remote",
    }
    weather = tools["weather__get_weather"]
    assert weather.parameters["required"] == ["city"]
    assert weather.description == "The current weather in a city."
    # Read-only: may run again after a crash; send_email may not.
    assert weather.rerun_safe and not tools["weather__send_email"].rerun_safe


def test_one_session_serves_every_call_and_the_token_is_sent(server: McpServerProcess) -> None:
    """Three calls, concurrent ones too, and a listing: one session (one handshake on the
    server), every request with the bearer token."""
    before = server.sessions_opened()

    async def scenario() -> list[str]:
        servers = servers_for(server)
        try:
            weather = await tool(servers, "get_weather")
            first = await servers.call(weather, {"city": "Paris"}, timeout=10)
            rest = await asyncio.gather(
                *(servers.call(weather, {"city": c}, timeout=10) for c in ("Oslo", "Rome"))
            )
            assert servers.sessions_opened(SERVER_NAME) == 1
            return [r.text for r in (first, *rest) if not r.is_error]
        finally:
            await servers.close()

    texts = run(scenario())
    assert len(texts) == 3 and '"city": "Paris"' in texts[0], texts
    assert FORECAST["forecast"] in texts[0]
    assert server.sessions_opened() == before + 1
    assert all(r["authorized"] for r in server.requests())


def test_a_wrong_token_is_an_unavailable_server(server: McpServerProcess) -> None:
    async def scenario() -> None:
        config = McpServerConfig(SERVER_NAME, server.url, "wrong-token")
        servers = McpServers({SERVER_NAME: config})
        try:
            with pytest.raises(McpUnavailable):
                await servers.tools(SERVER_NAME)
        finally:
            await servers.close()

    run(scenario())


def test_is_error_is_a_result_and_slow_is_a_timeout(server: McpServerProcess) -> None:
    """A tool that fails answers ``isError`` with its text; a call slower than its timeout
    raises TimeoutError and leaves the session usable."""

    async def scenario() -> None:
        servers = servers_for(server)
        try:
            broken = await servers.call(await tool(servers, "broken"), {}, timeout=10)
            assert broken.is_error and "the weather station is offline" in broken.text
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await servers.call(await tool(servers, "slow"), {"seconds": 30}, timeout=0.5)
            assert loop.time() - started < 5
            after = await servers.call(await tool(servers, "get_weather"), {"city": "X"}, 10)
            assert not after.is_error
            assert servers.sessions_opened(SERVER_NAME) == 1
        finally:
            await servers.close()

    run(scenario())


def test_tool_lists_are_cached_for_a_minute(server: McpServerProcess) -> None:
    now = [1000.0]

    async def scenario() -> None:
        servers = servers_for(server, clock=lambda: now[0])
        try:

            def lists() -> int:
                return server.methods().count("tools/list")

            before = lists()
            await servers.tools(SERVER_NAME)
            now[0] += LIST_TTL - 1
            await servers.tools(SERVER_NAME)
            assert lists() == before + 1
            now[0] += 2
            await servers.tools(SERVER_NAME)
            assert lists() == before + 2
        finally:
            await servers.close()

    run(scenario())


def test_a_server_down_then_back_gets_a_new_session(tmp_path: Path) -> None:
    """Killed: calls fail at once as unavailable (not after their timeout), the last tool list
    still stands; started again: the next call opens a new session and succeeds."""
    process = McpServerProcess(tmp_path, token=TOKEN).start()
    now = [0.0]

    async def scenario() -> None:
        servers = servers_for(process, clock=lambda: now[0])
        try:
            weather = await tool(servers, "get_weather")
            assert not (await servers.call(weather, {"city": "A"}, timeout=10)).is_error
            process.kill()
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(2):
                with pytest.raises(McpUnavailable):
                    await servers.call(weather, {"city": "B"}, timeout=10)
            assert loop.time() - started < 5
            now[0] += LIST_TTL + 1
            # Not listable now, but the last listing stands: its tools stay offered.
            assert (await servers.tools(SERVER_NAME)).tools
            process.start()
            assert not (await servers.call(weather, {"city": "C"}, timeout=10)).is_error
            assert servers.sessions_opened(SERVER_NAME) == 2
        finally:
            await servers.close()
            process.kill()

    run(scenario())
    assert process.executions("get_weather") == ["A", "C"]


def test_a_call_in_flight_when_the_server_dies_is_not_sent_again(tmp_path: Path) -> None:
    process = McpServerProcess(tmp_path).start()

    async def scenario() -> None:
        servers = servers_for(process)
        try:
            slow = await tool(servers, "slow")
            call = asyncio.create_task(servers.call(slow, {"seconds": 5, "label": "x"}, 20))
            await _until(lambda: process.executions("slow", "start") == ["x"])
            process.kill()
            with pytest.raises(McpUnavailable):
                await call
            process.start()
            # The next request opens a new session; the killed call was not resent.
            await servers.tools(SERVER_NAME)
            assert process.executions("slow", "start") == ["x"]
        finally:
            await servers.close()
            process.kill()

    run(scenario())


def test_a_server_that_forgot_the_session_is_asked_again_on_a_new_one(tmp_path: Path) -> None:
    """With the initialize handshake (servers before the 2026 protocol keep sessions), a
    restarted server answers 404 to the old session: the request had not run, so it is sent
    once more on a new session."""
    process = McpServerProcess(tmp_path).start()

    async def scenario() -> None:
        config = McpServerConfig(SERVER_NAME, process.url)
        servers = McpServers({SERVER_NAME: config}, session=lambda c: McpSession(c, mode="legacy"))
        try:
            weather = await tool(servers, "get_weather")
            assert not (await servers.call(weather, {"city": "A"}, timeout=10)).is_error
            process.kill()
            process.start()
            assert not (await servers.call(weather, {"city": "B"}, timeout=10)).is_error
            assert servers.sessions_opened(SERVER_NAME) == 2
        finally:
            await servers.close()
            process.kill()

    run(scenario())
    assert process.executions("get_weather") == ["A", "B"]
    assert process.methods().count("initialize") == 2


async def _until(condition: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
