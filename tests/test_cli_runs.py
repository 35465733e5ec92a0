"""The producer-side commands end to end: `send post --wait`, `send tool-outputs`, `demo`."""

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run
from tests.support.runs import burst, create_body, model_env, serving
from worker.testing import FakeOpenAI

WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay=0.05).running_in_thread() as server:
        yield server


async def cli(env: dict[str, str], *args: str, within: float = 90) -> tuple[int, str, str]:
    """Run ``python -m worker ARGS`` with ``env``; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"{' '.join(args)} did not finish within {within} s:\n{out.decode()}\n{err.decode()}"
        ) from None
    return int(process.returncode or 0), out.decode(), err.decode()


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any model or storage configuration of its own."""
    drop = {"OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "AzureWebJobsStorage"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **values}


def test_send_post_wait_prints_the_answer(storage: StorageEnv, fake: FakeOpenAI) -> None:
    """`send post --wait` posts, waits on a temporary reply queue and prints the reply."""
    env = storage.env(**model_env(fake.base_url, WORKER_TOOLS="tests.support.runs"))
    chat_id = f"cli-{storage.suffix}"
    run(storage.send(create_body(chat_id, "ChatState")))
    run(burst(storage.settings(**model_env(fake.base_url))))

    async def scenario() -> tuple[int, str, str]:
        async with serving(storage.settings(**model_env(fake.base_url))):
            return await cli(
                clean_env(**env),
                "send",
                "post",
                chat_id,
                "What's the weather like right now in my favorite city?",
                "--wait",
                "--timeout",
                "60",
            )

    code, out, err = run(scenario())
    assert code == 0, err
    reply = json.loads(out)
    assert reply["type"] == "assistantReply"
    assert reply["status"] == "completed"
    assert reply["content"] == WEATHER_ANSWER
    assert reply["recentMessages"][0]["role"] == "User"
    assert "waiting for the reply" in err


def test_external_tool_outputs_from_the_cli(storage: StorageEnv, fake: FakeOpenAI) -> None:
    """A run waiting for an external tool is resumed by `send tool-outputs`."""
    chat_id = f"ext-{storage.suffix}"
    lookup = {
        "type": "function",
        "function": {
            "name": "lookupOrder",
            "description": "Look up an order",
            "parameters": {"type": "object", "properties": {"orderId": {"type": "string"}}},
        },
    }
    fake.script("order-bot", [{"tool_calls": [{"name": "lookupOrder", "arguments": {"orderId": "42"}}]},
                              {"content": "Your order has shipped."}])  # fmt: skip
    settings = storage.settings(**model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="order-bot"))
    env = clean_env(**storage.env(**model_env(fake.base_url)))
    run(storage.send(create_body(chat_id, "ChatState", tools=[lookup])))
    run(burst(settings))
    reply_queue = f"rep-{storage.suffix}"

    async def scenario() -> dict[str, Any]:
        async with serving(settings):
            code, _, err = await cli(
                env, "send", "post", chat_id, "Where is my order?", "--reply-to", reply_queue
            )
            assert code == 0, err
            events = await wait_for_event(storage, reply_queue, "toolCallsRequired")
            [call] = events["toolCalls"]
            assert call["name"] == "lookupOrder"
            code, _, err = await cli(
                env,
                "send",
                "tool-outputs",
                chat_id,
                events["runId"],
                "--output",
                f"{call['id']}=shipped yesterday",
            )
            assert code == 0, err
            return await wait_for_event(storage, reply_queue, "assistantReply")

    reply = run(scenario())
    assert reply["status"] == "completed"
    assert reply["content"] == "Your order has shipped."


async def wait_for_event(storage: StorageEnv, queue: str, kind: str) -> dict[str, Any]:
    """The first event of ``kind`` on a reply queue (bounded: 30 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        for body in await storage.peek_all(queue):
            event = json.loads(body)
            if event.get("type") == kind:
                return dict(event)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {kind} event on {queue} within 30 s")


def test_demo_runs_the_weather_conversation_offline(storage: StorageEnv) -> None:
    """`assistant-worker demo --once` (what `make run` runs) shows the whole conversation."""
    env = clean_env(
        AzureWebJobsStorage=storage.connection_string,
        WORKER_REQUESTS_QUEUE=storage.requests_queue,
        WORKER_RUNS_QUEUE=storage.runs_queue,
        WORKER_MAX_POLLING_INTERVAL="0.5",
    )
    code, out, err = run(cli(env, "demo", "--once", within=200))
    assert code == 0, f"{out}\n{err}"
    for line in (
        "[User]      What's the weather like right now in my favorite city?",
        "[Assistant] calls getUserFavoriteCity({})",
        "[Tool]      getUserFavoriteCity -> Seattle, WA",
        "[Tool]      getCityNickname -> The Emerald City",
        "[Tool]      getWeatherAtLocation -> 70 degrees and sunny",
        f"[Assistant] {WEATHER_ANSWER}",
        "status completed",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert '"exists": true' in out
