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
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, Tool

from worker.config.settings import McpServerConfig
from worker.mcp.errors import McpRefused, McpUnavailable, reason_of
from worker.mcp.session import McpSession
from worker.mcp.tools import (
    MAX_ERROR_CHARS,
    MAX_FUNCTION_NAME,
    McpListing,
    McpResult,
    McpTool,
    cut,
    function_name,
    server_of,
)

log = structlog.get_logger("worker.mcp")

# Seconds a server's tool list is used before it is listed again (SPEC §5.5: a minute).
LIST_TTL = 60.0
# Seconds a server that failed to list its tools is left alone before it is asked again.
FAILURE_TTL = 5.0
# Seconds one listing (every page) may take.
LIST_TIMEOUT = 10.0
# Pages of tools/list read at most (a server that pages forever cannot hold a step).
MAX_PAGES = 20


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

    def offers(self, function: str) -> bool:
        """Whether ``function`` (``server__tool``) is a tool a configured server listed the last
        time it was asked: a name the operator's servers give, not one the model made up (the
        bound of the ``execute_tool`` span names, SPEC §10)."""
        server = server_of(function)
        cached = self._listings.get(server) if server is not None else None
        if cached is None:
            return False
        return any(tool.function == function for tool in cached.listing.tools)

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
        """``tools/call`` on the tool's server within ``timeout`` seconds. A tool that failed
        is a result (``is_error``); the request's own failures raise ``TimeoutError``,
        ``McpUnavailable`` (not reached, or the session broke) or ``McpRefused``."""

        async def send(client: Client) -> CallToolResult:
            return await client.call_tool(tool.name, arguments)

        try:
            result = await self._sessions[tool.server].request(send, timeout)
        except MCPError as error:
            raise McpRefused(cut(error.message, MAX_ERROR_CHARS) or reason_of(error)) from None
        except (TimeoutError, McpUnavailable):
            raise
        except Exception as error:  # an answer the SDK could not read, say
            raise McpRefused(reason_of(error)) from None
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
                why = f"invalid input schema ({cut(error.message, 100)})"
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
