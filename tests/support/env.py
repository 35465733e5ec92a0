"""Per-test storage: unique queue and table names, settings, and direct SDK access.

Tests look at queues and tables with the real Azure SDK (never mocks) to check what the
worker did.
"""

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueServiceClient

from tests.support.azurite import Azurite
from worker.config.settings import Settings


@dataclass(frozen=True)
class StorageEnv:
    """One test's view of Azurite: its own queues and chat table."""

    azurite: Azurite
    suffix: str

    @classmethod
    def fresh(cls, azurite: Azurite) -> "StorageEnv":
        return cls(azurite, uuid.uuid4().hex[:10])

    @property
    def connection_string(self) -> str:
        return self.azurite.connection_string

    @property
    def requests_queue(self) -> str:
        return f"req-{self.suffix}"

    @property
    def runs_queue(self) -> str:
        return f"runs-{self.suffix}"

    @property
    def deadlines_queue(self) -> str:
        return f"deadlines-{self.suffix}"

    @property
    def requests_poison(self) -> str:
        return f"{self.requests_queue}-poison"

    @property
    def table(self) -> str:
        return f"Chats{self.suffix}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables for a worker of this test (fast polling and retries)."""
        values = {
            "AzureWebJobsStorage": self.connection_string,
            "WORKER_REQUESTS_QUEUE": self.requests_queue,
            "WORKER_RUNS_QUEUE": self.runs_queue,
            "WORKER_DEADLINES_QUEUE": self.deadlines_queue,
            "WORKER_MAX_POLLING_INTERVAL": "0.5",
            "WORKER_RETRY_DELAY": "1",
            "WORKER_RETRY_MAX_DELAY": "2",
            "WORKER_LOG_FORMAT": "json",
        }
        values.update(extra)
        return values

    def settings(self, **extra: str) -> Settings:
        return Settings.from_env(self.env(**extra))

    @asynccontextmanager
    async def queues(self) -> AsyncIterator[QueueServiceClient]:
        async with QueueServiceClient.from_connection_string(self.connection_string) as client:
            yield client

    @asynccontextmanager
    async def tables(self) -> AsyncIterator[TableServiceClient]:
        async with TableServiceClient.from_connection_string(self.connection_string) as client:
            yield client

    async def send(self, body: str | Mapping[str, Any], queue: str | None = None) -> str:
        """Put a body on a queue (the requests queue by default); returns the message id."""
        text = body if isinstance(body, str) else json.dumps(body)
        async with self.queues() as service:
            client = service.get_queue_client(queue or self.requests_queue)
            with suppress(ResourceExistsError):
                await client.create_queue()
            sent = await client.send_message(text)
            return str(sent.id)

    async def peek_all(self, queue: str) -> list[str]:
        """Bodies of the visible messages of a queue (at most 32), by receiving then releasing.

        Receiving raises their dequeue counts; a queue that does not exist has none.
        """
        async with self.queues() as service:
            client = service.get_queue_client(queue)
            try:
                messages = [
                    m
                    async for m in client.receive_messages(
                        messages_per_page=32, max_messages=32, visibility_timeout=5
                    )
                ]
            except ResourceNotFoundError:
                return []
            for message in messages:
                await client.update_message(message.id, message.pop_receipt, visibility_timeout=0)
            return [str(m.content) for m in messages]

    async def queue_exists(self, queue: str) -> bool:
        async with self.queues() as service:
            try:
                await service.get_queue_client(queue).get_queue_properties()
            except ResourceNotFoundError:
                return False
            return True

    async def count(self, queue: str) -> int:
        async with self.queues() as service:
            try:
                props = await service.get_queue_client(queue).get_queue_properties()
            except ResourceNotFoundError:
                return 0
            return int(props.approximate_message_count or 0)

    async def partition(self, chat_id: str, table: str = "ChatState") -> dict[str, dict[str, Any]]:
        """Every row of one chat, by RowKey."""
        async with self.tables() as service:
            client = service.get_table_client(table)
            rows = client.query_entities("PartitionKey eq @pk", parameters={"pk": chat_id})
            return {str(row["RowKey"]): dict(row) async for row in rows}


async def wait_until(condition: Callable[[], bool], within: float, what: str = "condition") -> None:
    """Poll ``condition`` every 20 ms; fail with ``what`` if it does not hold ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.02)


def run(coro: Any) -> Any:
    """Run a coroutine from a sync test (no pytest-asyncio: one event loop per call)."""
    return asyncio.run(coro)


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """The JSON log events a worker process wrote (non-JSON lines are skipped)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
