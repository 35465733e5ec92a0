"""The fake OpenAI server, driven by the real `openai` clients over real HTTP.

Sync tests use the server's thread mode and `openai.OpenAI`; async ones run `asyncio.run` with
`async with FakeOpenAI()` and `openai.AsyncOpenAI`. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import openai
import pytest
from openai.types.beta.threads import Run
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from openai.types.responses import FunctionToolParam, Response

from worker.testing import FakeOpenAI

REPO_ROOT = Path(__file__).resolve().parent.parent
DELAY = 0.05  # background delay of the fake in these tests
T = TypeVar("T")

WEATHER_OUTPUTS = {
    "getUserFavoriteCity": "Seattle, WA",
    "getCityNickname": "The Emerald City",
    "getWeatherAtLocation": "70 degrees and sunny",
}
WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."
CHAT_TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": {}}},
    }
    for name in WEATHER_OUTPUTS
]
RESPONSE_TOOLS: list[FunctionToolParam] = [
    {
        "type": "function",
        "name": name,
        "parameters": {"type": "object", "properties": {}},
        "strict": False,
    }
    for name in WEATHER_OUTPUTS
]
assistants = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # beta Assistants API


def wait_for(check: Callable[[], T | None], *, timeout: float = 5.0, what: str) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay=DELAY).running_in_thread() as server:
        yield server


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5) as c:
        yield c


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A raw HTTP call (no SDK): status and decoded JSON."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- Chat Completions ---------------------------------------------------------------------------


def test_chat_weather_scenario_parallel_tool_calls_then_answer(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "What's the weather in my favorite city?"},
    ]
    rounds: list[list[tuple[str, dict[str, Any]]]] = []
    for _ in range(4):
        completion = client.chat.completions.create(
            model="gpt-4o-weather", messages=messages, tools=CHAT_TOOLS, temperature=0
        )
        choice = completion.choices[0]
        assert completion.usage is not None and completion.usage.total_tokens > 0
        calls = [c for c in choice.message.tool_calls or [] if c.type == "function"]
        if not calls:
            assert choice.finish_reason == "stop"
            break
        assert choice.finish_reason == "tool_calls"
        rounds.append([(c.function.name, json.loads(c.function.arguments)) for c in calls])
        messages.append(choice.message.model_dump(exclude_none=True))  # type: ignore[arg-type]
        messages.extend(
            {"role": "tool", "tool_call_id": c.id, "content": WEATHER_OUTPUTS[c.function.name]}
            for c in calls
        )
    assert rounds == [
        [("getUserFavoriteCity", {})],
        [
            ("getCityNickname", {"location": "Seattle, WA"}),
            ("getWeatherAtLocation", {"location": "Seattle, WA"}),
        ],
    ]
    assert choice.message.content == WEATHER_ANSWER


def test_chat_answer_is_built_from_tool_outputs(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="weather", messages=[{"role": "user", "content": "hi"}], tools=CHAT_TOOLS
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    assert call.type == "function"
    history: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"},
        first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps("Paris, FR")},
    ]
    second = client.chat.completions.create(model="weather", messages=history, tools=CHAT_TOOLS)
    calls = [c for c in second.choices[0].message.tool_calls or [] if c.type == "function"]
    history.append(second.choices[0].message.model_dump(exclude_none=True))  # type: ignore[arg-type]
    outputs = {"getCityNickname": "The City of Light", "getWeatherAtLocation": "12 degrees, rain"}
    history.extend(
        {"role": "tool", "tool_call_id": c.id, "content": outputs[c.function.name]} for c in calls
    )
    final = client.chat.completions.create(model="weather", messages=history, tools=CHAT_TOOLS)
    assert final.choices[0].message.content == (
        "The weather in The City of Light (Paris, FR) is currently 12 degrees, rain."
    )


def test_chat_echo_and_invalid_requests(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.choices[0].message.content == "You said: hello there"
    assert reply.usage is not None and reply.usage.prompt_tokens >= 1
    unanswered: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
    ]
    with pytest.raises(openai.BadRequestError, match="call_1"):
        client.chat.completions.create(model="m", messages=unanswered)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream_options={"include_usage": True},
        )


def test_scripted_turns_in_order_async_client() -> None:
    async def scenario() -> list[tuple[str | None, list[str]]]:
        async with (
            FakeOpenAI() as fake,
            openai.AsyncOpenAI(
                base_url=fake.base_url, api_key="k", max_retries=0, timeout=5
            ) as client,
            aiohttp.ClientSession() as http_session,
        ):
            fake.script("scripted", [{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}])
            async with http_session.post(
                fake.url + "/admin/script",
                json={"model": "scripted", "turns": [{"content": "second"}]},
            ) as admin:
                assert admin.status == 200
            async with http_session.post(
                fake.url + "/admin/script", json={"model": "scripted", "turns": [{"bad": 1}]}
            ) as admin:
                assert admin.status == 400
            assert fake.pending_turns("scripted") == 2
            seen: list[tuple[str | None, list[str]]] = []
            for _ in range(3):
                completion = await client.chat.completions.create(
                    model="scripted", messages=[{"role": "user", "content": "go"}]
                )
                message = completion.choices[0].message
                seen.append(
                    (
                        message.content,
                        [
                            f"{c.function.name}{c.function.arguments}"
                            for c in message.tool_calls or []
                            if c.type == "function"
                        ],
                    )
                )
            assert fake.calls(model="scripted", api="chat") == 3
            return seen

    assert asyncio.run(scenario()) == [
        (None, ['f{"a":1}']),
        ("second", []),
        ("You said: go", []),  # the script is used up: the default scenario answers
    ]


# -- Responses API ------------------------------------------------------------------------------


def _until_done(client: openai.OpenAI, response: Response) -> Response:
    statuses = {response.status}

    def check() -> Response | None:
        current = client.responses.retrieve(response.id)
        statuses.add(current.status)
        return current if current.status not in ("queued", "in_progress") else None

    done = wait_for(check, what=f"response {response.id} to finish")
    assert statuses <= {"queued", "in_progress", "completed"}
    return done


def test_responses_background_chain_with_function_calls(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.background_delay = 2.0  # long enough to see the intermediate states for sure
    created = client.responses.create(
        model="gpt-weather",
        input="What's the weather in my favorite city?",
        instructions="You are a weather bot.",
        tools=RESPONSE_TOOLS,
        background=True,
        store=True,
    )
    assert created.status == "queued" and created.output == []
    assert client.responses.retrieve(created.id).status in ("queued", "in_progress")
    fake.background_delay = DELAY
    response = _until_done(client, created)
    for _ in range(3):
        assert response.status == "completed"
        assert response.usage is not None and response.usage.total_tokens > 0
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            break
        response = _until_done(
            client,
            client.responses.create(
                model="gpt-weather",
                previous_response_id=response.id,
                input=[
                    {
                        "type": "function_call_output",
                        "call_id": c.call_id,
                        "output": WEATHER_OUTPUTS[c.name],
                    }
                    for c in calls
                ],
                tools=RESPONSE_TOOLS,
                background=True,
                store=True,
            ),
        )
    assert response.output_text == WEATHER_ANSWER
    assert fake.calls(api="responses") == 3
    assert fake.calls(endpoint="responses.retrieve") >= 4


def test_responses_missing_tool_output_and_other_errors(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.script("m", [{"tool_calls": [{"name": "a"}, {"name": "b"}]}])
    first = client.responses.create(model="m", input="hi", tools=RESPONSE_TOOLS)
    assert first.status == "completed"  # without background: complete at once
    call_ids = [item.call_id for item in first.output if item.type == "function_call"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model="m",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call_ids[0], "output": "ok"}],
        )
    assert info.value.message.endswith(f"No tool output found for function call {call_ids[1]}.")
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"
    answered = client.responses.create(
        model="m",
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": call_id, "output": "ok"}
            for call_id in call_ids
        ],
    )
    assert answered.output_text == "You said: hi"
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model="m", input="x", background=True, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")


def test_responses_cancel(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.background_delay = 5.0
    created = client.responses.create(model="m", input="x", background=True, store=True)
    assert client.responses.cancel(created.id).status == "cancelled"
    assert client.responses.retrieve(created.id).status == "cancelled"


# -- Assistants API -----------------------------------------------------------------------------


@assistants
def test_assistants_weather_flow(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    beta = client.beta
    assistant = beta.assistants.create(
        model="gpt-4o", name="Weather Bot", instructions="You are a weather bot.", tools=CHAT_TOOLS
    )
    assert assistant.id.startswith("asst_") and beta.assistants.retrieve(assistant.id).name
    thread = beta.threads.create()
    beta.threads.messages.create(thread.id, role="user", content="What's the weather?")
    fake.script("gpt-4o", [{"tool_calls": [{"name": "getUserFavoriteCity"}]}])
    fake.set_default("weather")
    run = beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "queued"
    with pytest.raises(openai.BadRequestError, match="active"):
        beta.threads.messages.create(thread.id, role="user", content="too early")

    def settled(current: Run) -> Run:
        def check() -> Run | None:
            polled = beta.threads.runs.retrieve(current.id, thread_id=thread.id)
            return polled if polled.status not in ("queued", "in_progress") else None

        return wait_for(check, what=f"run {current.id} to settle")

    run = settled(run)
    rounds: list[list[str]] = []
    while run.status == "requires_action":
        assert run.required_action is not None
        calls = run.required_action.submit_tool_outputs.tool_calls
        rounds.append([c.function.name for c in calls])
        if len(calls) > 1:
            with pytest.raises(openai.BadRequestError, match="Expected tool outputs"):
                beta.threads.runs.submit_tool_outputs(
                    run.id,
                    thread_id=thread.id,
                    tool_outputs=[{"tool_call_id": calls[0].id, "output": "x"}],
                )
        run = beta.threads.runs.submit_tool_outputs(
            run.id,
            thread_id=thread.id,
            tool_outputs=[
                {"tool_call_id": c.id, "output": WEATHER_OUTPUTS[c.function.name]} for c in calls
            ],
        )
        assert run.status in ("queued", "in_progress")
        run = settled(run)
    assert rounds == [["getUserFavoriteCity"], ["getCityNickname", "getWeatherAtLocation"]]
    assert run.status == "completed" and run.usage is not None
    newest_first = beta.threads.messages.list(thread.id)
    assert [m.role for m in newest_first.data] == ["assistant", "user"]
    answer = newest_first.data[0].content[0]
    assert answer.type == "text" and answer.text.value == WEATHER_ANSWER
    oldest = beta.threads.messages.list(thread.id, order="asc", limit=1)
    assert [m.role for m in oldest.data] == ["user"] and oldest.has_more
    assert beta.assistants.delete(assistant.id).deleted
    with pytest.raises(openai.NotFoundError):
        beta.assistants.retrieve(assistant.id)


@assistants
def test_assistants_poll_helper_and_run_expiry(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    beta = client.beta
    assistant = beta.assistants.create(model="gpt-weather", tools=CHAT_TOOLS)
    thread = beta.threads.create(messages=[{"role": "user", "content": "weather?"}])
    # The SDK's poll helper follows the fake's `openai-poll-after-ms` header, so this is quick.
    run = beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "requires_action" and run.expires_at is not None
    fake.run_expiry = 0.0  # the pending tool outputs were never submitted in time
    expired = beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert expired.status == "expired" and expired.required_action is None
    with pytest.raises(openai.BadRequestError, match="expired"):
        beta.threads.runs.submit_tool_outputs(run.id, thread_id=thread.id, tool_outputs=[])
    with pytest.raises(openai.NotFoundError):
        beta.threads.runs.retrieve("run_unknown", thread_id=thread.id)


# -- Azure paths and authentication -------------------------------------------------------------


def test_azure_paths_and_auth_recording(fake: FakeOpenAI) -> None:
    with openai.OpenAI(
        base_url=f"{fake.url}/openai/v1/", api_key="azure-secret", max_retries=0
    ) as v1:
        reply = v1.chat.completions.create(
            model="my-deployment", messages=[{"role": "user", "content": "v1"}]
        )
        assert reply.choices[0].message.content == "You said: v1"
        assert v1.responses.create(model="my-deployment", input="r").output_text == "You said: r"
    with openai.AzureOpenAI(
        azure_endpoint=fake.url, api_key="azure-secret", api_version="2024-10-21", max_retries=0
    ) as dated:
        reply = dated.chat.completions.create(
            model="dated-deployment", messages=[{"role": "user", "content": "dated"}]
        )
        assert reply.choices[0].message.content == "You said: dated"
    status, body = http(
        "POST",
        fake.base_url + "/chat/completions",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "anon"}]}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and body["object"] == "chat.completion"
    records = fake.requests
    assert [(r.path, r.had_auth) for r in records] == [
        ("/openai/v1/chat/completions", True),
        ("/openai/v1/responses", True),
        ("/openai/deployments/dated-deployment/chat/completions", True),
        ("/v1/chat/completions", False),
    ]
    assert records[2].model == "dated-deployment"
    assert "azure-secret" not in json.dumps([r.to_dict() for r in records])


def test_bad_input_gets_openai_shaped_errors(fake: FakeOpenAI) -> None:
    headers = {"Content-Type": "application/json"}
    status, body = http("POST", fake.base_url + "/chat/completions", b"{not json", headers)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http("POST", fake.base_url + "/responses", b"[1, 2]", headers)
    assert status == 400 and "error" in body
    status, body = http("POST", fake.base_url + "/chat/completions", b'{"model": 3}', headers)
    assert status == 400 and body["error"]["param"] == "model"
    status, body = http("GET", fake.base_url + "/threads/thread_nope/runs/run_nope")
    assert status == 404 and "thread_nope" in body["error"]["message"]
    status, body = http("GET", fake.base_url + "/no/such/route")
    assert status == 404 and body["error"]["message"].startswith("Invalid URL")
    status, body = http("GET", fake.url + "/admin/requests")
    assert status == 200 and len(body["requests"]) == 5
    assert http("POST", fake.url + "/admin/reset", b"{}", headers)[0] == 200
    assert fake.requests == []


# -- Faults -------------------------------------------------------------------------------------


def _chat(client: openai.OpenAI, model: str = "m") -> str | None:
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}]
    )
    return completion.choices[0].message.content


def test_fault_429_with_retry_after(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault("429", count=1, retry_after=7)
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client)
    assert info.value.response.headers["retry-after"] == "7"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "rate_limit_exceeded"
    assert _chat(client) == "You said: x"  # count=1: only the first call
    # The SDK's own retry honours Retry-After (here 10 ms) and then succeeds.
    fake.fault("429", count=1, retry_after=0.01)
    with openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=1, timeout=5) as retrying:
        assert _chat(retrying) == "You said: x"
    assert [r.fault for r in fake.requests] == ["429", None, "429", None]


def test_fault_every_second_call_and_filters(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault("500", every=2, model="flaky")
    outcomes: list[str] = []
    for _ in range(6):
        try:
            _chat(client, "flaky")
            outcomes.append("ok")
        except openai.InternalServerError:
            outcomes.append("500")
        _chat(client, "steady")  # another model: never faulted, not counted
    assert outcomes == ["ok", "500"] * 3
    fake.clear_faults()
    status, body = http(
        "POST",
        fake.url + "/admin/faults",
        json.dumps({"kind": "500", "count": 1, "endpoint": "responses.retrieve"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and body["fault"]["endpoint"] == ["responses.retrieve"]
    created = client.responses.create(model="m", input="x")  # create is not filtered
    with pytest.raises(openai.InternalServerError):
        client.responses.retrieve(created.id)
    assert client.responses.retrieve(created.id).status == "completed"


def test_fault_drop_and_slow(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault("drop", count=1)
    with pytest.raises(openai.APIConnectionError):
        _chat(client)
    fake.fault("slow", count=1, delay=2.0)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert _chat(client) == "You said: x"


# -- Entry point --------------------------------------------------------------------------------


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of `process`, read in a daemon thread so the wait is bounded."""
    stdout = process.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def test_module_entry_point_prints_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "worker.testing.fake_openai", "--port", "0"]
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [*command, "--scenario", "weather"],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        line = _first_line(process, timeout=10)
        assert line, f"no URL line; stderr: {stderr_path.read_text()}"
        info = json.loads(line)
        assert info["base_url"] == info["url"] + "/v1"
        with openai.OpenAI(base_url=info["base_url"], api_key="k", max_retries=0) as client:
            reply = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], tools=CHAT_TOOLS
            )
        calls = reply.choices[0].message.tool_calls or []
        assert [c.function.name for c in calls if c.type == "function"] == ["getUserFavoriteCity"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "Warning" not in stderr_path.read_text()  # e.g. no double import under -m
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
