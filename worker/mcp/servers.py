"""The MCP servers an operator allow-listed (``WORKER_MCP_SERVERS``): their tools and calls.

``McpServers`` holds one :class:`~worker.mcp.session.McpSession` per server, opened on first
use. A server's tools (``tools/list``, every page) are cached for a minute; a server that
cannot list them is not asked again for a few seconds, and meanwhile its last listing, however
old, still stands (its calls then fail, each with a reason the model reads). Each tool becomes
a function named ``{server}__{tool}`` with the server's input JSON Schema.

Which tools may run again after a crash interrupted them: those whose annotations say they are
read-only or idempotent (``readOnlyHint``, ``idempotentHint``). Annotations are hints an
untrusted server could lie with, but the worker talks only to servers an operator configured,
and the cost of a lie is one repeated call, not an unauthorized one.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from mcp import Client
from mcp.types import CallToolResult, Tool

from worker.config.settings import McpServerConfig
from worker.mcp.session import McpSession, McpUnavailable, reason_of

log = structlog.get_logger("worker.mcp")

# Seconds a server's tool list is used before it is listed again (SPEC §5.5: a minute).
LIST_TTL = 60.0
# Seconds a server that failed to list its tools is left alone before it is asked again.
FAILURE_TTL = 5.0
# Seconds one listing (every page) may take.
LIST_TIMEOUT = 10.0
# Pages of tools/list read at most (a server that pages forever cannot hold a step).
MAX_PAGES = 20
# A function name OpenAI accepts.
MAX_FUNCTION_NAME = 64
SEPARATOR = "__"
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]")
# Validation errors shown to the model at most, and the length of each.
MAX_ERRORS_SHOWN = 10
MAX_ERROR_CHARS = 300


def function_name(server: str, tool: str) -> str:
    """The name the model calls a server's tool by: ``{server}__{tool}``, with characters
    OpenAI does not take in a name (``.``, ``/``, ...) written ``_``."""
    return f"{server}{SEPARATOR}{_NOT_IN_NAMES.sub('_', tool)}"


def server_of(function: str) -> str | None:
    """The server a function name points to (``weather`` of ``weather__get``), or None."""
    server, separator, tool = function.partition(SEPARATOR)
    return server if separator and server and tool else None


@dataclass(frozen=True, eq=False)
class McpTool:
    """One tool of one server, as the model is offered it."""

    server: str
    # Its name on the server (what tools/call sends).
    name: str
    # What the model calls it: {server}__{name}.
    function: str
    description: str
    # The server's input JSON Schema (an object at the root).
    parameters: Mapping[str, Any]
    # Safe to run again after a crash interrupted a call (read-only or idempotent).
    rerun_safe: bool
    validator: Any

    def definition(self) -> dict[str, Any]:
        """The Chat Completions tool definition (a copy: backends may add keys)."""
        return {
            "type": "function",
            "function": {
                "name": self.function,
                "description": self.description,
                "parameters": copy.deepcopy(dict(self.parameters)),
            },
        }

    def check(self, arguments: Mapping[str, Any]) -> str | None:
        """What is wrong with ``arguments`` for the server's schema, or None."""
        errors = sorted(
            self.validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path]
        )
        if not errors:
            return None
        parts = []
        for error in errors[:MAX_ERRORS_SHOWN]:
            where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
            parts.append(f"{where}: {_cut(str(error.message), MAX_ERROR_CHARS)}")
        if len(errors) > MAX_ERRORS_SHOWN:
            parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
        return "; ".join(parts)


@dataclass(frozen=True)
class McpListing:
    """A server's tools, and the names of those that cannot be offered (and why)."""

    server: str
    tools: tuple[McpTool, ...]
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class McpResult:
    """A ``tools/call`` answer: its text for the model, and whether the tool failed."""

    text: str
    is_error: bool


@dataclass(frozen=True)
class _Cached:
    listing: McpListing
    at: float


@dataclass(frozen=True)
class _Failed:
    reason: str
    at: float


class McpServers:
    """The worker's MCP servers, by name: sessions, tool lists, calls. One per process."""

    def __init__(
        self,
        configs: Mapping[str, McpServerConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
        session: Callable[[McpServerConfig], McpSession] = McpSession,
    ) -> None:
        self._sessions = {name: session(config) for name, config in configs.items()}
        self._clock = clock
        self._listings: dict[str, _Cached] = {}
        self._failures: dict[str, _Failed] = {}
        self._locks = {name: asyncio.Lock() for name in configs}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def __contains__(self, name: object) -> bool:
        return name in self._sessions

    def sessions_opened(self, server: str) -> int:
        return self._sessions[server].opened

    async def tools(self, server: str) -> McpListing:
        """The server's tools, cached for ``LIST_TTL``. Raises ``McpUnavailable`` when they
        cannot be listed and never were."""
        cached = self._listings.get(server)
        if cached is not None and self._clock() - cached.at < LIST_TTL:
            return cached.listing
        async with self._locks[server]:
            # Another task may have listed them while this one waited.
            cached = self._listings.get(server)
            now = self._clock()
            if cached is not None and now - cached.at < LIST_TTL:
                return cached.listing
            failed = self._failures.get(server)
            if failed is None or now - failed.at >= FAILURE_TTL:
                try:
                    listing = await self._list(server)
                except Exception as error:
                    failed = _Failed(_unavailable(error), self._clock())
                    self._failures[server] = failed
                    log.warning("mcp.list_failed", server=server, error=failed.reason)
                else:
                    self._failures.pop(server, None)
                    self._listings[server] = _Cached(listing, self._clock())
                    return listing
            if cached is not None:
                return cached.listing  # stale, but its tools stay offered
            raise McpUnavailable(failed.reason)

    async def _list(self, server: str) -> McpListing:
        async def every_page(client: Client) -> list[Tool]:
            found: list[Tool] = []
            cursor: str | None = None
            for _ in range(MAX_PAGES):
                page = await client.list_tools(cursor=cursor)
                found.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    break
            return found

        listed = await self._sessions[server].request(every_page, LIST_TIMEOUT)
        listing = describe_tools(server, listed)
        if listing.skipped:
            log.warning("mcp.tools_skipped", server=server, skipped=list(listing.skipped))
        return listing

    async def call(
        self,
        tool: McpTool,
        arguments: dict[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> McpResult:
        """``tools/call`` on the tool's server within ``timeout`` seconds. Raises
        ``TimeoutError``, ``McpUnavailable`` (not reached, or the session broke), or the SDK's
        error when the server refused the request."""

        async def send(client: Client) -> CallToolResult:
            return await client.call_tool(tool.name, arguments)

        result = await self._sessions[tool.server].request(send, timeout)
        return McpResult(result_text(result), bool(result.is_error))

    async def close(self) -> None:
        """Close every session (at shutdown)."""
        await asyncio.gather(*(s.close() for s in self._sessions.values()))


def _unavailable(error: BaseException) -> str:
    if isinstance(error, McpUnavailable):
        return str(error)
    if isinstance(error, TimeoutError):
        return f"no answer within {LIST_TIMEOUT:g} s"
    return reason_of(error)


def describe_tools(server: str, listed: Iterable[Tool]) -> McpListing:
    """The tools the model can be offered: a name that fits OpenAI's 64 characters once
    prefixed (and is not taken twice), and an input schema that is a valid JSON Schema of an
    object (OpenAI refuses anything else, and would fail the whole model call)."""
    tools: list[McpTool] = []
    skipped: list[str] = []
    taken: set[str] = set()
    for tool in listed:
        function = function_name(server, tool.name)
        schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
        why = None
        if len(function) > MAX_FUNCTION_NAME:
            why = "name too long"
        elif function in taken:
            why = f"name taken by another tool as {function}"
        elif schema.get("type", "object") != "object":
            why = "input schema is not an object"
        if why is None:
            try:
                validator_class = validator_for(schema)
                validator_class.check_schema(schema)
            except SchemaError as error:
                why = f"invalid input schema ({_cut(error.message, 100)})"
        if why is not None:
            skipped.append(f"{tool.name}: {why}")
            continue
        taken.add(function)
        parameters = {"type": "object", "properties": {}, **schema}
        annotations = tool.annotations
        rerun_safe = annotations is not None and bool(
            annotations.read_only_hint or annotations.idempotent_hint
        )
        tools.append(
            McpTool(
                server=server,
                name=tool.name,
                function=function,
                description=tool.description or tool.title or "",
                parameters=parameters,
                rerun_safe=rerun_safe,
                validator=validator_class(schema),
            )
        )
    return McpListing(server, tuple(tools), tuple(skipped))


def result_text(result: CallToolResult) -> str:
    """What the model reads of a result: its text blocks (an embedded text resource is text
    too), a short note for each image, audio or binary block, and the structured content as
    JSON when there is no text."""
    parts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(str(getattr(block, "text", "")))
        elif kind in ("image", "audio"):
            data = str(getattr(block, "data", ""))
            parts.append(f"[{kind}: {getattr(block, 'mime_type', '')}, {len(data)} base64 chars]")
        elif kind == "resource_link":
            parts.append(f"[resource: {getattr(block, 'uri', '')}]")
        elif kind == "resource":
            resource = getattr(block, "resource", None)
            text = getattr(resource, "text", None)
            parts.append(
                str(text) if text is not None else f"[resource: {getattr(resource, 'uri', '')}]"
            )
        else:
            parts.append(f"[{kind or 'content'}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    # Never empty: some OpenAI-compatible servers refuse an empty tool message.
    return "\n".join(parts) if parts else "(no output)"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
