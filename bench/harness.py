"""A worker process and a producer for the benchmarks, on one Azurite and the fake model.

- ``WorkerProcess``: ``assistant-worker run`` as a child process (as deployed), its settings in
  the environment, its log in a file; stopped with SIGTERM (SIGKILL after a bound).
- ``Producer``: the benchmark's side, on storage clients tagged ``BENCH_USER_AGENT`` (so that
  Azurite's request log tells its requests from the worker's): sends creates and posts, reads
  the replies of its own reply queue as they arrive (the arrival time of each is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, VENV_BIN
from bench.requests import bench_queue_service, bench_table_service
from worker.devtools.azurite import die_with_parent

QUESTION = "What's the weather like right now in my favorite city?"
WEATHER_MODEL = "weather-bot"
ECHO_MODEL = "echo-bot"
WEATHER_TOOLS = "worker.devtools.weather"


def worker_env(
    connection: str,
    suffix: str,
    *,
    base_url: str | None = None,
    model: str = WEATHER_MODEL,
    tools: str = WEATHER_TOOLS,
    **settings: str,
) -> dict[str, str]:
    """The environment of a worker process on queues named after ``suffix``; ``settings`` as
    ``WORKER_MAX_POLLING_INTERVAL="1"``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "OTEL_", "AZURE_"))}
    env.pop("OPENAI_API_KEY", None)
    env.update(
        {
            "AzureWebJobsStorage": connection,
            "WORKER_REQUESTS_QUEUE": f"req-{suffix}",
            "WORKER_RUNS_QUEUE": f"runs-{suffix}",
            "WORKER_DEADLINES_QUEUE": f"dl-{suffix}",
            "WORKER_LOG_FORMAT": "json",
            "WORKER_TOOLS": tools,
            "CHAT_MODEL_DEPLOYMENT_NAME": model,
        }
    )
    if base_url is not None:
        env["OPENAI_BASE_URL"] = base_url
        env["OPENAI_API_KEY"] = "sk-bench"
    env.update(settings)
    return env


class WorkerProcess:
    """``assistant-worker run`` as a child process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def requests_queue(self) -> str:
        return self.env["WORKER_REQUESTS_QUEUE"]

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start and wait until the worker has its queues and receives."""
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [str(VENV_BIN / "assistant-worker"), "run"],
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the worker exited: {self.log_path.read_text()[-2000:]}")
            if b'"worker.started"' in self.log_path.read_bytes():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the worker did not start within {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Reply:
    event: dict[str, Any]
    arrived: float  # time.time() when the producer received it


@dataclass
class Producer:
    """The benchmark's producer: requests out, replies back (on its own tagged clients)."""

    connection: str
    requests_queue: str
    reply_queue: str = field(default_factory=lambda: f"rep-{uuid.uuid4().hex[:10]}")
    poll_interval: float = 0.01
    replies: dict[str, Reply] = field(default_factory=dict)
    # The other events (toolCallsRequired, toolApprovalRequired), in arrival order.
    events: list[dict[str, Any]] = field(default_factory=list)

    async def __aenter__(self) -> Producer:
        from worker.queues.azure import AzureQueueBroker

        self._service = bench_queue_service(self.connection)
        self.broker = AzureQueueBroker(self._service)
        await self.broker.ensure_queues([self.requests_queue, self.reply_queue])
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self._service.close()

    async def send(self, payload: dict[str, Any], delay: float = 0.0) -> float:
        """Send a request; returns when it was sent (``time.time()`` before the call)."""
        sent = time.time()
        await self.broker.send(self.requests_queue, json.dumps(payload), delay=delay)
        return sent

    async def create(self, chat_id: str, **fields: Any) -> float:
        return await self.send({"type": "assistantCreate", "id": chat_id, **fields})

    async def post(self, chat_id: str, text: str = QUESTION, **fields: Any) -> tuple[str, float]:
        """Post ``text`` with a reply to this producer's queue; (request id, sent at)."""
        request_id = f"r-{uuid.uuid4().hex[:16]}"
        payload = {
            "type": "assistantPost",
            "id": chat_id,
            "userMessage": text,
            "requestId": request_id,
            "replyTo": self.reply_queue,
            **fields,
        }
        return request_id, await self.send(payload)

    async def reply(self, request_id: str, within: float = 60.0) -> Reply:
        """The ``assistantReply`` of ``request_id`` (TimeoutError after ``within`` s)."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: request_id in self.replies)
        return self.replies[request_id]

    async def event(self, kind: str, within: float = 60.0, **match: Any) -> dict[str, Any]:
        """The first event of type ``kind`` with the given fields (TimeoutError after
        ``within`` s)."""

        def found() -> dict[str, Any] | None:
            for event in self.events:
                if event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
            return None

        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: found() is not None)
        event = found()
        assert event is not None
        return event

    async def wait_replies(self, request_ids: list[str], within: float) -> None:
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: all(r in self.replies for r in request_ids))

    async def _read(self) -> None:
        queue = self.broker.queue(self.reply_queue)
        while True:
            try:
                deliveries = await queue.receive(32, 30)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            arrived = time.time()
            if not deliveries:
                await asyncio.sleep(self.poll_interval)
                continue
            for delivery in deliveries:
                with contextlib.suppress(Exception):
                    await queue.complete(delivery)
                try:
                    event = json.loads(delivery.body)
                except ValueError:
                    continue
                if event.get("type") == "assistantReply" and event.get("requestId"):
                    async with self._arrived:
                        self.replies[event["requestId"]] = Reply(event, arrived)
                        self._arrived.notify_all()
                elif isinstance(event, dict):
                    async with self._arrived:
                        self.events.append(event)
                        self._arrived.notify_all()


async def wait_created(
    connection: str, chat_ids: list[str], within: float = 60.0, table: str = "ChatState"
) -> None:
    """Until every chat exists (read on a tagged table client, one state row each)."""
    from azure.core.exceptions import ResourceNotFoundError

    from worker.store.layout import STATE_ROW

    pending = list(chat_ids)
    async with bench_table_service(connection) as service, asyncio.timeout(within):
        client = service.get_table_client(table)
        while pending:
            still = []
            for chat_id in pending:
                try:
                    await client.get_entity(chat_id, STATE_ROW)
                except ResourceNotFoundError:
                    still.append(chat_id)
            pending = still
            if pending:
                await asyncio.sleep(0.1)


def tool_rounds(fake_requests: list[Any], tag: str) -> list[Any]:
    """The fake's generating requests of the run whose user message contains ``tag``."""
    found = []
    for record in fake_requests:
        if record.endpoint not in ("chat.create", "responses.create"):
            continue
        body = record.json or {}
        if tag in json.dumps(body.get("messages") or body.get("input") or "")[-2000:]:
            found.append(record)
    return found
