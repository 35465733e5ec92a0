"""Helpers for the end-to-end tests of runs: counted tools, request bodies, replies, tables.

This module is also a tool module: ``WORKER_TOOLS=tests.support.runs`` registers its ``@tool``
functions in a worker process (and :func:`tool_registry` in-process). Worker processes are
separate processes, so each tool appends one JSON line per start and end of an execution to
the file named by ``RUNS_TOOL_LOG`` (when set); :class:`ToolLog` reads it back to count
executions across every process of a test.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient as SyncQueueClient

from handlers.services import RunServices
from handlers.tools import ToolRegistry, load_tools, tool
from schemas import AssistantState
from tests.support.env import StorageEnv
from worker.app import App, open_app
from worker.cli.state import read_state
from worker.config.settings import Settings
from worker.store.tables import TableChatStore
from worker.testing.fake_openai_brain import Conversation, Turn

T = TypeVar("T")

TOOL_LOG_ENV = "RUNS_TOOL_LOG"
THIS_MODULE = "tests.support.runs"
NICKNAMES = {"Seattle, WA": "The Emerald City"}
WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."


# --- counted tools (run in worker processes too) ------------------------------------------------


def _log_tool(name: str, event: str, key: str) -> None:
    """Append one line to the tool log; O_APPEND keeps lines whole across processes."""
    path = os.environ.get(TOOL_LOG_ENV)
    if not path:
        return
    line = json.dumps({"tool": name, "event": event, "key": key, "pid": os.getpid()})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@tool
def getUserFavoriteCity() -> str:
    """Get the user's favorite city."""
    _log_tool("getUserFavoriteCity", "start", "")
    _log_tool("getUserFavoriteCity", "end", "")
    return "Seattle, WA"


@tool
def getCityNickname(location: str) -> str:
    """Get the nickname of a city (e.g. location "San Francisco, CA")."""
    _log_tool("getCityNickname", "start", location)
    _log_tool("getCityNickname", "end", location)
    return NICKNAMES.get(location, f"The {location.split(',')[0]} Metropolis")


@tool
def getWeatherAtLocation(location: str, unit: str = "f") -> str:
    """Get the current weather at a location."""
    _log_tool("getWeatherAtLocation", "start", location)
    _log_tool("getWeatherAtLocation", "end", location)
    return "70 degrees and sunny" if unit == "f" else "21 degrees and sunny"


@tool
def note(label: str) -> str:
    """Record a label and return it (each label is used by exactly one tool call)."""
    _log_tool("note", "start", label)
    _log_tool("note", "end", label)
    return f"noted {label}"


@tool(idempotent=True)
async def slow_note(label: str, seconds: float) -> str:
    """Record a label after ``seconds`` (a tool still running when its worker is killed; safe
    to run again, so an interrupted call is started again)."""
    _log_tool("slow_note", "start", label)
    await asyncio.sleep(seconds)
    _log_tool("slow_note", "end", label)
    return f"slowly noted {label}"


@tool
async def slow_once(label: str, seconds: float) -> str:
    """Like ``slow_note``, but not safe to run twice (it "sends an email"): a call interrupted
    by its worker's death is answered as interrupted, never run again."""
    _log_tool("slow_once", "start", label)
    await asyncio.sleep(seconds)
    _log_tool("slow_once", "end", label)
    return f"sent {label}"


@tool
def big_output(size: int) -> str:
    """Return a text of exactly ``size`` characters (see ``big_text``)."""
    _log_tool("big_output", "start", str(size))
    _log_tool("big_output", "end", str(size))
    return big_text(size, "tool")


def big_text(size: int, seed: str) -> str:
    """A text of exactly ``size`` characters whose every line is different, with characters
    outside the BMP (two UTF-16 units each) so that a split at any unit boundary shows."""
    lines: list[str] = []
    length = n = 0
    while length < size:
        line = f"{seed} line {n:07d} \U0001f326 the quick brown fox jumps over the lazy dog\n"
        lines.append(line)
        length += len(line)
        n += 1
    return "".join(lines)[:size]


def two_notes(conversation: Conversation) -> Turn:
    """A fake-model scenario: two parallel ``note`` calls labelled after the user message,
    then the answer ``done <message>``. Every label is unique to one call of one run."""
    label = conversation.last_user_text()
    if not conversation.tool_results():
        return {
            "tool_calls": [
                {"name": "note", "arguments": {"label": f"{label}/a"}},
                {"name": "note", "arguments": {"label": f"{label}/b"}},
            ]
        }
    return {"content": f"done {label}"}


def tool_registry() -> ToolRegistry:
    """This module's tools, as ``WORKER_TOOLS=tests.support.runs`` registers them."""
    return load_tools([THIS_MODULE])


@dataclass(frozen=True)
class ToolLog:
    """The executions the counted tools recorded (all processes of a test)."""

    path: Path

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
        return entries

    def count(self, event: str = "end") -> Counter[tuple[str, str]]:
        """How many executions (``end``: finished, ``start``: begun) per (tool, key)."""
        return Counter((e["tool"], e["key"]) for e in self.entries() if e["event"] == event)

    def per_tool(self, event: str = "end") -> Counter[str]:
        return Counter(e["tool"] for e in self.entries() if e["event"] == event)

    def has(self, tool_name: str, key: str, event: str) -> bool:
        return self.count(event)[(tool_name, key)] > 0


# --- request bodies -----------------------------------------------------------------------------


def create_body(chat_id: str, table: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "assistantCreate",
        "id": chat_id,
        "requestId": f"create-{chat_id}",
        "collectionName": table,
        "instructions": "You are a weather bot.",
    }
    body.update(fields)
    return body


def post_body(chat_id: str, table: str, text: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "assistantPost",
        "id": chat_id,
        "collectionName": table,
        "userMessage": text,
    }
    body.update(fields)
    return body


def model_env(base_url: str, **extra: str) -> dict[str, str]:
    """Settings that point a worker at the fake model (the weather bot by default)."""
    values = {
        "OPENAI_BASE_URL": base_url,
        "OPENAI_API_KEY": "sk-test",
        "CHAT_MODEL_DEPLOYMENT_NAME": "weather-bot",
        "WORKER_POLL_BACKOFF": "0",
    }
    values.update(extra)
    return values


# --- running a worker in-process ----------------------------------------------------------------


async def burst(settings: Settings, tools: ToolRegistry | None = None, within: float = 60) -> App:
    """Run a worker until its queues are empty (delayed steps included); returns the app."""
    async with open_app(settings, tools=tools if tools is not None else tool_registry()) as app:
        await asyncio.wait_for(app.worker.run_until_idle(), timeout=within)
        return app


@contextlib.asynccontextmanager
async def serving(settings: Settings, tools: ToolRegistry | None = None) -> AsyncIterator[App]:
    """A worker serving in the background of the running loop; stopped on exit."""
    async with open_app(settings, tools=tools if tools is not None else tool_registry()) as app:
        task = asyncio.create_task(app.worker.run())
        try:
            yield app
        finally:
            app.worker.stop()
            await asyncio.wait_for(task, 30)


@dataclass(frozen=True)
class SentMessage:
    queue: str
    payload: dict[str, Any]
    delay: float


def record_sends(app: App, into: list[SentMessage]) -> Callable[..., Awaitable[str]]:
    """A replacement for ``app.broker.send`` that records every message the worker sends
    (queue, decoded payload, the ``Send.delay`` given) before sending it."""
    original = app.broker.send

    async def send(queue: str, body: str, *, delay: float = 0.0, **options: Any) -> str:
        into.append(SentMessage(queue, decode(body), delay))
        return await original(queue, body, delay=delay, **options)

    return send


# --- faults in what a worker sends ---------------------------------------------------------


def lose_steps(app: App) -> None:
    """Drop the steps of the first run the worker starts (as if they were lost or
    dead-lettered); the steps of later runs go out as usual. Every step goes through the
    runs queue (none is taken in-process), where such losses happen."""
    app.worker.in_process_steps = False
    original = app.broker.send
    lost: list[str] = []

    async def send(queue: str, body: str, **options: Any) -> str:
        payload = json.loads(body) if body.startswith("{") else {}
        if payload.get("type") == "runStep":
            lost[:] = lost or [payload["runId"]]
            if payload["runId"] == lost[0]:
                return "lost"
        return await original(queue, body, **options)

    app.broker.send = send  # type: ignore[method-assign]


def duplicate_steps(app: App) -> list[str]:
    """Send every runStep twice (as a duplicated message would be): both copies are taken
    together, so the same step runs twice at the same time. Returns the duplicated run ids."""
    app.worker.in_process_steps = False  # every step through the queue, to be doubled
    original = app.broker.send
    doubled: list[str] = []

    async def send(queue: str, body: str, **options: Any) -> str:
        message_id = await original(queue, body, **options)
        payload = json.loads(body) if body.startswith("{") else {}
        if payload.get("type") == "runStep":
            doubled.append(str(payload["runId"]))
            await original(queue, body, **options)
        return message_id

    app.broker.send = send  # type: ignore[method-assign]
    return doubled


async def eventually(
    check: Callable[[], Awaitable[T | None]], within: float, what: str | Callable[[], str]
) -> T:
    """Poll an async ``check`` every 50 ms until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {within:g} s waiting for {message}")
        await asyncio.sleep(0.05)


# --- queues -------------------------------------------------------------------------------------


def decode(body: str) -> dict[str, Any]:
    """A message body as JSON: plain JSON, or Base64 of JSON."""
    text = body.strip()
    if not text.startswith("{"):
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            text = base64.b64decode(text, validate=True).decode("utf-8")
    value = json.loads(text)
    assert isinstance(value, dict), body[:200]
    return value


@dataclass
class ReplyQueue:
    """A producer's ``replyTo`` queue: every event received so far (read and deleted)."""

    storage: StorageEnv
    name: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A producer creates its reply queue: the worker sends no event to one that is missing.
        client = SyncQueueClient.from_connection_string(self.storage.connection_string, self.name)
        with client, contextlib.suppress(ResourceExistsError):
            client.create_queue()

    async def drain(self) -> list[dict[str, Any]]:
        async with self.storage.queues() as service:
            client = service.get_queue_client(self.name)
            try:
                messages = [
                    m
                    async for m in client.receive_messages(
                        messages_per_page=32, max_messages=32, visibility_timeout=30
                    )
                ]
            except Exception:
                return self.events  # not created yet
            for message in messages:
                self.events.append(decode(str(message.content)))
                await client.delete_message(message)
        return self.events

    async def wait_for(
        self, kind: str, within: float, count: int = 1, **match: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events of type ``kind`` (with the given fields) arrived."""

        def found() -> list[dict[str, Any]]:
            return [
                e
                for e in self.events
                if e.get("type") == kind and all(e.get(k) == v for k, v in match.items())
            ]

        async def check() -> list[dict[str, Any]] | None:
            await self.drain()
            hits = found()
            return hits if len(hits) >= count else None

        return await eventually(
            check,
            within,
            lambda: f"{count} {kind} event(s) {match} on {self.name}; got {self.events}",
        )


async def poison_letters(storage: StorageEnv, *queues: str) -> list[dict[str, Any]]:
    letters: list[dict[str, Any]] = []
    for queue in queues or (storage.requests_poison, f"{storage.runs_queue}-poison"):
        letters.extend(json.loads(body) for body in await storage.peek_all(queue))
    return letters


# --- tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRows:
    """One chat's rows, split by kind."""

    state: dict[str, Any]
    messages: list[dict[str, Any]]
    runs: list[dict[str, Any]]

    @classmethod
    def of(cls, rows: Mapping[str, dict[str, Any]]) -> ChatRows:
        return cls(
            state=rows.get("state", {}),
            messages=[rows[k] for k in sorted(rows) if k.startswith("msg-")],
            runs=sorted(
                (row for key, row in rows.items() if key.startswith("run-")),
                key=lambda row: int(row["Seq"]),
            ),
        )

    @property
    def roles(self) -> list[str]:
        return [str(m["Role"]) for m in self.messages]


async def chat_rows(storage: StorageEnv, chat_id: str, table: str) -> ChatRows:
    return ChatRows.of(await storage.partition(chat_id, table))


async def runs_finished(
    storage: StorageEnv, chat_id: str, table: str, count: int
) -> ChatRows | None:
    """The chat's rows once ``count`` runs exist and all have ended, else None."""
    rows = await chat_rows(storage, chat_id, table)
    ended = {"completed", "failed", "cancelled", "expired", "incomplete"}
    if len(rows.runs) >= count and all(r["Status"] in ended for r in rows.runs):
        return rows
    return None


def full_content(row: Mapping[str, Any]) -> str:
    """A message's whole text, joined from the lossless split (``Content``, ``ContentPart2``...)."""
    parts = int(row.get("ContentParts") or 1)
    return str(row.get("Content") or "") + "".join(
        str(row.get(f"ContentPart{n}", "")) for n in range(2, parts + 1)
    )


def tool_calls_of(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    text = row.get("ToolCalls") or ""
    if not text:
        return []
    value = json.loads(str(text))
    assert isinstance(value, list), text
    return value


def history_problems(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """What makes a stored history invalid for the next model call: an assistant tool-call
    message not followed by one result per call, or a tool result that answers nothing."""
    problems: list[str] = []
    rows = list(messages)
    i = 0
    while i < len(rows):
        row = rows[i]
        key = row["RowKey"]
        if row["Role"] == "Tool":
            problems.append(f"{key}: tool result {row.get('Name')!r} answers no open call")
            i += 1
            continue
        calls = tool_calls_of(row) if row["Role"] == "Assistant" else []
        wanted = [str(call["id"]) for call in calls]
        i += 1
        answered: list[str] = []
        while i < len(rows) and rows[i]["Role"] == "Tool":
            answered.append(str(rows[i].get("Name")))
            i += 1
        if sorted(answered) != sorted(wanted):
            problems.append(f"{key}: calls {wanted} answered by {answered}")
    return problems


async def query_state(
    settings: Settings, chat_id: str, table: str, since: datetime | None = None
) -> AssistantState:
    """The extension's ``assistantQuery`` through the library call behind ``state``."""
    return await read_state(settings, chat_id, table, "AzureWebJobsStorage", since)


def elapsed() -> Callable[[], float]:
    started = time.monotonic()
    return lambda: time.monotonic() - started


def services_on(
    store: TableChatStore, settings: Settings, clock: Callable[[], datetime]
) -> RunServices:
    """Handler services whose every chat is in ``store``, with no model and no tool (for a
    handler called directly, without a worker)."""

    class Stores:
        async def get(self, setting: str, table: str, *, create: bool = False) -> TableChatStore:
            return store

    return RunServices(
        stores=Stores(),  # type: ignore[arg-type]
        settings=settings,
        backends={},
        tools=ToolRegistry(),
        clock=clock,
    )
