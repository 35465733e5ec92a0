"""MCP tools in a run (SPEC §5.5): which an assistant offers, and running the model's calls.

An assistant's ``mcpServers`` (stored with its defaults at create) name servers of
``WORKER_MCP_SERVERS``; their tools, listed by ``services.mcp``, are offered beside the
registered and external tools as ``{server}__{tool}``. A call of one runs like a registered
tool's, through the same claims (``handlers/step.py``): its arguments are checked against the
server's schema first, it has the tools' timeout, its span and its metric; and every failure of
it (the server down, too slow, refusing, or answering ``isError``) is a result ``error: ...``
that the model reads, never a failed run. This module does not load the ``mcp`` SDK.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from handlers.tool_calls import ToolCall, ToolResult, parse_arguments
from handlers.tools import ToolRegistry, shorten
from worker.mcp.errors import McpError, McpRefused, McpUnavailable
from worker.mcp.tools import McpListing, McpTool, server_of

if TYPE_CHECKING:
    from worker.mcp.servers import McpServers

log = structlog.get_logger("worker.runs")


@dataclass(frozen=True)
class McpCall:
    """A call of an MCP tool as its ``execute_tool`` span records it: the call, and its server."""

    id: str
    name: str
    arguments: str
    server: str


@dataclass(frozen=True)
class McpToolset:
    """The MCP tools one assistant offers: by function name, and why the tools of a server it
    uses could not be listed."""

    servers: tuple[str, ...] = ()
    tools: Mapping[str, McpTool] | None = None
    unavailable: Mapping[str, str] | None = None

    def definitions(self, taken: Collection[str] = ()) -> list[dict[str, Any]]:
        """Chat Completions tool definitions, in listing order; a name already ``taken`` by a
        registered or external tool stays theirs."""
        return [t.definition() for name, t in (self.tools or {}).items() if name not in taken]

    def get(self, name: str) -> McpTool | None:
        return (self.tools or {}).get(name)

    def server_of(self, name: str) -> str | None:
        """The assistant's MCP server a function name belongs to, or None (for approvals: the
        ``server`` of a ``toolApprovalRequired`` call)."""
        server = server_of(name)
        return server if server in self.servers else None

    def rerun_safe(self, name: str) -> bool:
        """Whether a call of ``name`` may run again after a crash interrupted it."""
        tool = self.get(name)
        return tool is not None and tool.rerun_safe


NO_MCP_TOOLS = McpToolset()


def mcp_entries(defaults: Mapping[str, Any]) -> list[tuple[str, frozenset[str] | None]]:
    """(server, the tools allowed or None for all) of the assistant's stored ``mcpServers``."""
    entries: list[tuple[str, frozenset[str] | None]] = []
    for entry in defaults.get("mcpServers") or ():
        if isinstance(entry, str):
            entries.append((entry, None))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            allowed = entry.get("allowedTools")
            names = frozenset(str(n) for n in allowed) if isinstance(allowed, list) else None
            entries.append((entry["name"], names))
    return entries


async def load_toolset(servers: McpServers | None, defaults: Mapping[str, Any]) -> McpToolset:
    """The assistant's MCP tools: each of its servers listed (cached), at the same time. A
    server that cannot be listed, or is no longer allow-listed, offers nothing and its calls
    are answered with the reason."""
    entries = mcp_entries(defaults)
    if not entries:
        return NO_MCP_TOOLS
    unavailable: dict[str, str] = {}
    wanted = []
    for name, allowed in entries:
        if servers is None or name not in servers:
            unavailable[name] = "it is not allowed (WORKER_MCP_SERVERS no longer names it)"
        else:
            wanted.append((name, allowed))
    listed = await asyncio.gather(
        *(_listing(servers, name) for name, _ in wanted if servers is not None)
    )
    tools: dict[str, McpTool] = {}
    for (name, allowed), listing in zip(wanted, listed, strict=True):
        if isinstance(listing, str):
            unavailable[name] = listing
            continue
        for tool in listing.tools:
            if allowed is None or tool.name in allowed:
                tools.setdefault(tool.function, tool)
    return McpToolset(tuple(name for name, _ in entries), tools, unavailable)


async def _listing(servers: McpServers, name: str) -> McpListing | str:
    try:
        return await servers.tools(name)
    except McpError as error:
        return str(error)


async def run_mcp_call(
    servers: McpServers | None,
    toolset: McpToolset,
    call: ToolCall,
    *,
    registry: ToolRegistry,
    # A per-call limit that turns into a result, as for registered tools.
    timeout: float,  # noqa: ASYNC109
    redact: Callable[[str], str] = lambda text: text,
) -> ToolResult:
    """Run one call on its server, inside the registry's tool span (with the server's name);
    every failure becomes a result with ``ok=False``."""
    server = toolset.server_of(call.name) or ""
    running = _run(servers, toolset, call, server, registry, timeout, redact)
    tracer = registry.call_tracer
    if tracer is None:
        return await running
    result: ToolResult = await tracer(McpCall(call.id, call.name, call.arguments, server), running)
    return result


async def _run(
    servers: McpServers | None,
    toolset: McpToolset,
    call: ToolCall,
    server: str,
    registry: ToolRegistry,
    timeout: float,  # noqa: ASYNC109
    redact: Callable[[str], str],
) -> ToolResult:
    def failed(output: str) -> ToolResult:
        return ToolResult(call.id, call.name, "error: " + redact(output), ok=False)

    tool = toolset.get(call.name)
    if tool is None or servers is None:
        reason = (toolset.unavailable or {}).get(server)
        if reason is not None:
            return failed(f"MCP server {server!r} is unavailable: {reason}")
        offered = [n for n in (toolset.tools or {}) if server_of(n) == server]
        return failed(
            f"unknown tool {shorten(call.name, 100)!r}; MCP server {server!r} offers: "
            f"{', '.join(offered) or 'none'}"
        )
    parsed = parse_arguments(call)
    if isinstance(parsed, str):
        return failed(parsed)
    problem = tool.check(parsed)
    if problem is not None:
        return failed(f"invalid arguments for tool {call.name!r}: {problem}")

    started = time.monotonic()

    def observed(outcome: str) -> None:
        registry.observe(call.name, outcome, time.monotonic() - started)

    try:
        result = await servers.call(tool, parsed, timeout)
    except TimeoutError:
        observed("cancelled")
        return failed(f"tool {call.name!r} timed out after {timeout:g} s (MCP server {server!r})")
    except McpUnavailable as error:
        observed("error")
        return failed(f"MCP server {server!r} is unavailable: {error}")
    except McpRefused as error:
        observed("error")
        return failed(f"MCP server {server!r} refused the call to {tool.name!r}: {error}")
    except asyncio.CancelledError:
        observed("cancelled")
        raise
    if result.is_error:
        observed("error")
        return failed(result.text)
    observed("ok")
    return ToolResult(call.id, call.name, result.text, ok=True)
