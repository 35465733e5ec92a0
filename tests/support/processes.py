"""Worker processes for end-to-end tests: start, poll their JSON log, stop them for sure.

Every wait here has a deadline and fails with an assertion that says what was awaited and
shows the end of the worker's log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, read_log, worker_command

T = TypeVar("T")

POLL_INTERVAL = 0.1
# A log tail long enough to see why a worker did not do what a test waited for.
LOG_TAIL_LINES = 30


def wait_until(
    check: Callable[[], T | None], *, timeout: float, what: str | Callable[[], str]
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(POLL_INTERVAL)


class WorkerProcess:
    """``python -m worker run ARGS`` with its stdout and stderr in one JSON log file.

    A context manager: on exit the process is SIGKILLed if it still runs, and reaped.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as log:
            # The child keeps its own copy of the descriptor.
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                worker_command("run", *args),
                cwd=REPO_ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self) -> str:
        lines = self.text().splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(lines)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far, all or those named ``name``."""
        if not self.log_path.exists():
            return []
        return [e for e in read_log(self.log_path) if name is None or e.get("event") == name]

    def wait_for_events(self, name: str, at_least: int, *, timeout: float) -> list[dict[str, Any]]:
        """Wait until the log holds ``at_least`` events named ``name`` (while the process runs)."""

        def check() -> list[dict[str, Any]] | None:
            found = self.events(name)
            if len(found) >= at_least:
                return found
            if not self.running:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode} before logging {at_least} "
                    f"{name!r} events (got {len(found)}); log tail:\n{self.tail()}"
                )
            return None

        return wait_until(
            check,
            timeout=timeout,
            what=lambda: (
                f"{at_least} {name!r} events (got {len(self.events(name))}); "
                f"log tail:\n{self.tail()}"
            ),
        )

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails (the process is left to ``kill``) if it runs past ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running after {timeout:.1f} s; log tail:\n{self.tail()}"
            ) from None


def create_request(chat_id: str, request_id: str, table: str, **fields: Any) -> dict[str, Any]:
    """An ``assistantCreate`` request body."""
    return {
        "type": "assistantCreate",
        "id": chat_id,
        "requestId": request_id,
        "collectionName": table,
        "instructions": f"You are assistant {chat_id}.",
        **fields,
    }


async def _send_all(storage: StorageEnv, bodies: list[str], parallel: int) -> None:
    async with storage.queues() as service:
        client = service.get_queue_client(storage.requests_queue)
        with contextlib.suppress(Exception):
            await client.create_queue()
        gate = asyncio.Semaphore(parallel)

        async def send(body: str) -> None:
            async with gate:
                await client.send_message(body)

        await asyncio.gather(*(send(body) for body in bodies))


def send_all(
    storage: StorageEnv, bodies: Iterable[str | Mapping[str, Any]], parallel: int = 16
) -> None:
    """Put every body on the test's requests queue through one client."""
    texts = [body if isinstance(body, str) else json.dumps(body) for body in bodies]
    asyncio.run(_send_all(storage, texts, parallel))


async def _table_rows(storage: StorageEnv, table: str) -> dict[str, dict[str, dict[str, Any]]]:
    partitions: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    async with storage.tables() as service:
        client = service.get_table_client(table)
        async for row in client.list_entities():
            partitions[str(row["PartitionKey"])][str(row["RowKey"])] = dict(row)
    return dict(partitions)


def table_rows(storage: StorageEnv, table: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row of a table: PartitionKey -> RowKey -> entity."""
    return asyncio.run(_table_rows(storage, table))


def queue_count(storage: StorageEnv, queue: str) -> int:
    return int(asyncio.run(storage.count(queue)))


async def _visible_count(storage: StorageEnv, queue: str) -> int:
    async with storage.queues() as service:
        return len(await service.get_queue_client(queue).peek_messages(max_messages=32))


def visible_count(storage: StorageEnv, queue: str) -> int:
    """How many messages of a queue are visible now (not leased), counting up to 32."""
    return asyncio.run(_visible_count(storage, queue))


def read_all(storage: StorageEnv, queue: str) -> list[str]:
    """Every body on a queue (at most 32), visible or not, left in place."""
    return [str(body) for body in asyncio.run(storage.peek_all(queue))]


def decode_text(body: str) -> str:
    """A body as the JSON text it carries: plain JSON as is, Base64 of JSON decoded."""
    stripped = body.strip()
    if stripped.startswith("{"):
        return stripped
    try:
        return base64.b64decode(stripped, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return body


def created_per_chat(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many ``message.completed`` events with ``outcome == "created"`` each chat got."""
    counts: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("event") == "message.completed" and event.get("outcome") == "created":
            counts[str(event.get("chat_id"))] += 1
    return dict(counts)
