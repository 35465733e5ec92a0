"""The producer-side commands end to end: `send post --wait`, `send tool-outputs`, `demo`."""

import asyncio
import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.azurite import REPO_ROOT
from tests.support.cli import clean_env, cli
from tests.support.env import StorageEnv, run
from tests.support.runs import burst, create_body, model_env, serving
from worker.devtools.demo import DEFAULT_PORTS
from worker.testing import FakeOpenAI

WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay=0.05).running_in_thread() as server:
        yield server


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
    # Short and true: the conversation once, the state's counts, what each token count means.
    assert out.count("[Tool]      getUserFavoriteCity -> Seattle, WA") == 1
    assert "exists: true, totalMessages: 8, totalTokens: " in out
    assert "(the latest model call's, as the extension counts)" in out
    assert "usage.totalTokens: " in out and "(all its model calls)" in out
    assert len(out.splitlines()) <= 30, out
    # The demo's reply queue was its own, for this conversation only.
    [replies] = re.findall(r"assistantReply on '(demo-replies-\w+)'", out)
    assert run(storage.queue_exists(replies)) is False


def test_the_demo_on_other_ports_prints_follow_ups_that_work() -> None:
    """With Azurite's default ports taken, the demo starts it on others, and the commands it
    prints for another terminal reach that Azurite and its worker: run as printed, they work."""
    with contextlib.ExitStack() as stack:
        for port in DEFAULT_PORTS:
            held = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):  # taken already: as good
                held.bind(("127.0.0.1", port))
                held.listen()
        demo = stack.enter_context(
            subprocess.Popen(
                [sys.executable, "-m", "worker", "demo"],
                cwd=REPO_ROOT,
                env=clean_env(WORKER_MAX_POLLING_INTERVAL="0.5"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        stack.callback(demo.kill)
        output = LineReader(demo)
        lines = output.until(lambda line: "poison list" in line, within=200)
        start = next(i for i, line in enumerate(lines) if "From another terminal" in line)
        commands = [line.strip() for line in lines[start + 1 :]]
        assert commands[0].startswith("export AzureWebJobsStorage='"), commands
        assert "10001" not in commands[0]
        script = "\n".join(commands[:1] + [c for c in commands[1:] if " state " in c])
        state = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert state.returncode == 0, state.stderr
        assert json.loads(state.stdout)["exists"] is True
        script = "\n".join(commands[:1] + [c for c in commands[1:] if " send post " in c])
        post = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
        assert post.returncode == 0, post.stderr
        assert json.loads(post.stdout)["status"] == "completed"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0, output.text()


class LineReader:
    """A process's output, read line by line in a thread, so that a wait for one is bounded."""

    def __init__(self, process: "subprocess.Popen[str]") -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        stream = process.stdout

        def pump() -> None:
            for line in stream:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, found: Callable[[str], bool], within: float) -> list[str]:
        """The lines so far, once one satisfies ``found``."""
        deadline = time.monotonic() + within
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"nothing like it within {within} s:\n{self.text()}") from None
            if line is None:
                raise AssertionError(f"the process ended first:\n{self.text()}")
            self.seen.append(line)
            if found(line):
                return list(self.seen)

    def text(self) -> str:
        return "\n".join(self.seen)
