"""Streamed runs through real worker processes (``python -m worker run``) on Azurite, the fake
model streaming over HTTP from the test process, the deltas on a reply queue or a real Redis
server: each API on each sink, a model stream that breaks mid-way (a dropped connection, a 429
after half the text), and a worker SIGKILLed in the middle of a ``responses`` stream whose
successor resumes it. Every stream is read back by the consumer rule
(``worker.client.stream``): it must assemble exactly the reply's content, the stored answer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, worker_command
from tests.support.processes import WorkerProcess, send_all, wait_until
from tests.support.runs import (
    ChatRows,
    burst,
    create_body,
    model_env,
    post_body,
    runs_finished,
)
from worker.client.stream import DeltaAssembler, EventSource, QueueEvents, RedisEvents, follow
from worker.connections.clients import queue_service
from worker.devtools.redis_server import RedisServer
from worker.queues.azure import AzureQueueBroker
from worker.streaming.redis_streams import RedisReader, stream_key
from worker.testing import FakeOpenAI

pytestmark = pytest.mark.slow

QUESTION = "What's the weather like right now in my favorite city?"
WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."
LONG_ANSWER = " ".join(f"word{n:02d}" for n in range(40)) + " 🌦 the end."


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay=0.05, chunk_delay=0.02).running_in_thread() as server:
        yield server


def worker_env(storage: StorageEnv, fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    settings = {
        "WORKER_TOOLS": "tests.support.runs",
        "WORKER_STREAM_INTERVAL_MS": "100",
        "WORKER_MAX_POLLING_INTERVAL": "0.2",
        **extra,
    }
    return storage.env(**model_env(fake.base_url), **settings)


def create(storage: StorageEnv, fake: FakeOpenAI, body: dict[str, Any]) -> None:
    async def go() -> None:
        await storage.send(body)
        await burst(storage.settings(**model_env(fake.base_url)))

    asyncio.run(go())


def ensure_queue(storage: StorageEnv, queue: str) -> None:
    async def go() -> None:
        broker = AzureQueueBroker(queue_service(storage.settings().default_storage))
        try:
            await broker.ensure_queues([queue])
        finally:
            await broker.close()

    asyncio.run(go())


def read_events(
    storage: StorageEnv, source: str, request_id: str, *, chat_id: str, redis_url: str = ""
) -> tuple[DeltaAssembler, list[dict[str, Any]]]:
    """The request's events by the consumer rule: from the reply queue ``source``, or from
    its Redis stream (``source == "redis"``)."""
    seen: list[dict[str, Any]] = []

    async def go() -> DeltaAssembler:
        if source == "redis":
            return await follow(
                RedisEvents(redis_url, chat_id, request_id), within=60, on_event=seen.append
            )
        broker = AzureQueueBroker(queue_service(storage.settings().default_storage))
        try:
            events: EventSource = QueueEvents(broker, source, request_id)
            return await follow(events, within=60, on_event=seen.append)
        finally:
            await broker.close()

    return asyncio.run(go()), seen


def deltas_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "assistantDelta"]


def stored_answer(storage: StorageEnv, chat_id: str) -> ChatRows:
    rows = wait_until(
        lambda: asyncio.run(runs_finished(storage, chat_id, storage.table, 1)),
        timeout=30,
        what=f"the run of {chat_id} to finish",
    )
    assert rows is not None
    return rows


@pytest.mark.parametrize("sink", ["queue", "redis"])
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_streamed_post_through_a_worker_process(
    storage: StorageEnv,
    fake: FakeOpenAI,
    redis_server: RedisServer,
    tmp_path: Path,
    api: str,
    sink: str,
) -> None:
    """The weather bot, streamed: the text by deltas, the two parallel calls named by the
    second model call's last delta, the consumer rule assembling the stored answer."""
    chat_id = f"proc-{api}-{sink}-{storage.suffix}"
    replies = f"preplies-{storage.suffix}"
    ensure_queue(storage, replies)
    create(storage, fake, create_body(chat_id, storage.table, api=api))
    redis = {"WORKER_STREAM_REDIS_URL": redis_server.url} if sink == "redis" else {}
    with WorkerProcess(worker_env(storage, fake, **redis), tmp_path / "worker.log") as worker:
        worker.wait_for_events("worker.started", 1, timeout=30)
        send_all(storage, [post_body(chat_id, storage.table, QUESTION, replyTo=replies,
                                     requestId="ask", stream=True)])  # fmt: skip
        assembled, seen = read_events(
            storage, replies if sink == "queue" else "redis", "ask",
            chat_id=chat_id, redis_url=redis_server.url,
        )  # fmt: skip
        rows = stored_answer(storage, chat_id)
    reply = assembled.reply
    assert reply is not None and reply["status"] == "completed", worker.tail()
    assert assembled.complete
    assert assembled.text() == reply["content"] == WEATHER_ANSWER == rows.messages[-1]["Content"]
    deltas = deltas_of(seen)
    assert reply["deltaCount"] == len(deltas)
    calls = {d["step"]: d["toolCalls"] for d in deltas if d["toolCalls"]}
    assert sorted(c["name"] for c in calls[1]) == ["getCityNickname", "getWeatherAtLocation"]
    streamed = [r for r in fake.requests if r.json and r.json.get("stream") is True]
    assert len(streamed) == 3, "each of the three model calls streamed"


@pytest.mark.parametrize(
    ("kind", "after"),
    [("drop", {"after_fraction": 0.5}), ("429", {"after_fraction": 0.5})],
    ids=["connection-dropped", "429-after-half"],
)
def test_a_chat_stream_that_breaks_is_retried_under_the_next_attempt(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path, kind: str, after: dict[str, float]
) -> None:
    chat_id = f"broken-{kind}-{storage.suffix}"
    replies = f"breplies-{storage.suffix}"
    ensure_queue(storage, replies)
    create(storage, fake, create_body(chat_id, storage.table, chatModel="teller"))
    fake.script("teller", [{"content": LONG_ANSWER}, {"content": LONG_ANSWER}])
    rule = fake.fault(kind, count=1, api="chat", retry_after=0, **after)  # type: ignore[arg-type]
    with WorkerProcess(worker_env(storage, fake), tmp_path / "worker.log") as worker:
        worker.wait_for_events("worker.started", 1, timeout=30)
        send_all(storage, [post_body(chat_id, storage.table, "tell me", replyTo=replies,
                                     requestId="tell", stream=True)])  # fmt: skip
        assembled, seen = read_events(storage, replies, "tell", chat_id=chat_id)
        rows = stored_answer(storage, chat_id)
    assert rule.fired == 1
    reply = assembled.reply
    assert reply is not None and reply["status"] == "completed", worker.tail()
    deltas = deltas_of(seen)
    first = [d for d in deltas if d["attempt"] == 0]
    second = [d for d in deltas if d["attempt"] == 1]
    assert first, "the broken try's deltas were sent (and stay sent)"
    assert "".join(d["text"] for d in sorted(first, key=lambda d: d["seq"])) in LONG_ANSWER
    assert second and {d["step"] for d in deltas} == {0}
    assert reply["deltaCount"] == len(second), "the reply counts the kept attempt's deltas"
    assert assembled.complete
    assert assembled.text() == reply["content"] == LONG_ANSWER == rows.messages[-1]["Content"]


def test_a_worker_killed_mid_responses_stream_is_resumed_by_the_next(
    storage: StorageEnv, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Worker A streams a background response and is SIGKILLed mid-stream. Its post (the
    run's carrier) comes back to worker B, which takes the model call's claim over and
    resumes the response's event stream with ``starting_after`` the last checkpoint instead
    of creating another response: the same attempt, ``seq`` goes on (the last delta A sent may
    come twice), and the deltas add up to the stored answer."""
    chat_id = f"killed-{storage.suffix}"
    with FakeOpenAI(background_delay=0.05, chunk_delay=0.12).running_in_thread() as fake:
        create(storage, fake, create_body(chat_id, storage.table, api="responses",
                                          chatModel="teller", stream=True))  # fmt: skip
        fake.script("teller", [{"content": LONG_ANSWER}])
        env = worker_env(
            storage,
            fake,
            WORKER_STREAM_REDIS_URL=redis_server.url,
            WORKER_STREAM_INTERVAL_MS="250",
            WORKER_VISIBILITY_TIMEOUT="4",
        )
        key = stream_key(chat_id, "story")

        def deltas_so_far() -> int:
            async def count() -> int:
                reader = RedisReader(redis_server.url)
                try:
                    return len(await reader.read(key, block=0.05))
                finally:
                    await reader.close()

            return asyncio.run(count())

        with WorkerProcess(env, tmp_path / "a.log") as first:
            first.wait_for_events("worker.started", 1, timeout=30)
            send_all(storage, [post_body(chat_id, storage.table, "tell me a story",
                                         requestId="story")])  # fmt: skip
            wait_until(lambda: deltas_so_far() >= 3, timeout=30, what="three deltas from A")
            first.kill()
        assert fake.calls(endpoint="responses.create") == 1
        with WorkerProcess(env, tmp_path / "b.log") as second:
            assembled, seen = read_events(
                storage, "redis", "story", chat_id=chat_id, redis_url=redis_server.url
            )
            rows = stored_answer(storage, chat_id)
        resumes = [
            r.query for r in fake.requests
            if r.endpoint == "responses.retrieve" and "stream=true" in r.query
        ]  # fmt: skip
        created = fake.calls(endpoint="responses.create")
    reply = assembled.reply
    assert reply is not None and reply["status"] == "completed", second.tail()
    assert created == 1, "the response was followed, not created again"
    assert resumes and all("starting_after=" in query for query in resumes), resumes
    deltas = deltas_of(seen)
    assert {d["attempt"] for d in deltas} == {0}, "a resumed stream keeps its attempt"
    seqs = sorted({d["seq"] for d in deltas})
    assert seqs == list(range(len(seqs))), "seq goes on, with no gap"
    assert len(deltas) - len(seqs) <= 1, "at most the last delta of A comes twice"
    assert reply["deltaCount"] == len(seqs)
    assert assembled.complete
    assert assembled.text() == reply["content"] == LONG_ANSWER == rows.messages[-1]["Content"]


def test_send_post_wait_stream_prints_the_answer_as_it_comes_and_watch_replays_it(
    storage: StorageEnv, redis_server: RedisServer, tmp_path: Path
) -> None:
    """``send post --wait --stream`` prints the text while the model writes it (its first
    words long before it exits), then how the run ended; ``watch`` started after the run
    reads the request's Redis stream from its start and prints the same text."""
    chat_id = f"cli-{storage.suffix}"
    with FakeOpenAI(chunk_delay=0.08).running_in_thread() as fake:
        create(storage, fake, create_body(chat_id, storage.table, chatModel="teller"))
        fake.script("teller", [{"content": LONG_ANSWER}])
        env = worker_env(storage, fake, WORKER_STREAM_REDIS_URL=redis_server.url)
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("worker.started", 1, timeout=30)
            cli_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
            command = worker_command("send", "post", chat_id, "tell me", "--collection",
                                     storage.table, "--request-id", "told", "--wait",
                                     "--stream", "--timeout", "60")  # fmt: skip
            started = time.monotonic()
            sender = subprocess.Popen(
                command, env=cli_env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert sender.stdout is not None
            arrivals: list[tuple[float, bytes]] = []
            while chunk := os.read(sender.stdout.fileno(), 4096):
                arrivals.append((time.monotonic() - started, chunk))
            sender.wait(timeout=60)
            errors = sender.stderr.read().decode() if sender.stderr else ""
            watched = subprocess.run(
                worker_command("watch", chat_id, "told", "--timeout", "30"),
                env=cli_env, cwd=REPO_ROOT, capture_output=True, timeout=60, check=False,
            )  # fmt: skip
    assert sender.returncode == 0, errors
    printed = b"".join(chunk for _, chunk in arrivals).decode()
    assert printed.strip() == LONG_ANSWER
    text_arrivals = [at for at, chunk in arrivals if chunk.strip()]
    assert len(text_arrivals) >= 3, "the text came in several pieces"
    assert text_arrivals[-1] - text_arrivals[0] >= 1.0, "the first words came long before the last"
    assert "completed" in errors
    assert watched.returncode == 0, watched.stderr.decode()
    assert watched.stdout.decode().strip() == LONG_ANSWER
