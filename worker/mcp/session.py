"""The worker's one session with one MCP server: opened on first use, re-opened once it broke.

The SDK's ``Client`` lives inside an anyio task group that must be entered and left by the same
task, and a transport failure (the server went away) cancels that whole group. So the session
is owned by a task of its own, started on first use with an empty context (it belongs to no
message): it opens the client, hands it over, and holds it until it is closed or breaks.
Requests are made from the tasks of the messages that need them, each raced against the owner:
when the owner ends (the session broke) a request still waiting fails at once instead of
waiting for its timeout, and the next request opens a new session.

A request is never sent twice: one whose session broke is answered unavailable, since the
server may have acted on it. The one exception is a session the server no longer knows (a
server that keeps sessions and restarted answers 404): it refused the request without acting
on it, so the request goes once more, on a new session.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx2
import structlog
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CONNECTION_CLOSED, INVALID_REQUEST, Implementation

from worker.config.settings import McpServerConfig
from worker.mcp.errors import McpUnavailable, reason_of

T = TypeVar("T")

log = structlog.get_logger("worker.mcp")

CLIENT_INFO = Implementation(name="assistant-worker", version="0.1.0")
# Seconds to connect to a server (a whole request has its caller's timeout).
CONNECT_TIMEOUT = 10.0
# Seconds a closing session waits for the server to take its goodbye (a DELETE).
CLOSE_TIMEOUT = 5.0


def session_lost(error: MCPError) -> bool:
    """Whether the server refused a request because it no longer knows the session (a server
    that keeps sessions answers 404 after a restart: "Session not found" in its body, or the
    SDK's own "Session terminated"). A refused request was not run: it may be sent again."""
    return error.code == INVALID_REQUEST and "session" in error.message.lower()


class _Open:
    """One opened session: the client, the task that owns it, why it ended."""

    def __init__(self, client: Client, owner: asyncio.Task[None], closing: asyncio.Event) -> None:
        self.client = client
        self.owner = owner
        self.closing = closing


class McpSession:
    """One server's session, shared by every run of the worker process."""

    def __init__(self, config: McpServerConfig, *, mode: str = "auto") -> None:
        self.config = config
        # "auto": the 2026 protocol when the server speaks it, else the initialize handshake.
        self._mode = mode
        self._open: _Open | None = None
        self._opening = asyncio.Lock()
        # Why the last session ended, when it broke (for the requests that were waiting).
        self._broken: dict[asyncio.Task[None], str] = {}
        # Sessions opened so far: the first, then one per re-open.
        self.opened = 0

    @property
    def name(self) -> str:
        return self.config.name

    async def request(self, send: Callable[[Client], Awaitable[T]], timeout: float) -> T:  # noqa: ASYNC109
        """``send(client)`` on the open session (opened first if need be), within ``timeout``
        seconds in all. Raises ``TimeoutError`` when the time is up (the session stays: a slow
        answer is not a broken session), ``McpUnavailable`` when the server cannot be reached
        or the session broke (it is closed: the next request opens a new one), and the SDK's
        ``MCPError`` when the server answered the request with a protocol error."""
        deadline = asyncio.get_running_loop().time() + timeout
        for _ in range(2):
            current = await self._current(deadline)
            try:
                return await self._race(send(current.client), current, deadline)
            except MCPError as error:
                if not session_lost(error):
                    raise
                # The server forgot the session (it restarted): it did not act on the request.
                log.info("mcp.session_lost", server=self.name)
                await self._discard(current)
        raise McpUnavailable("the server forgets every new session (it answers 404)")

    async def _race(self, request: Awaitable[T], current: _Open, deadline: float) -> T:
        call = asyncio.ensure_future(request)
        owner = current.owner
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        done, _ = await asyncio.wait(
            (call, owner), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        if call in done:
            try:
                return call.result()
            except MCPError as error:
                if error.code != CONNECTION_CLOSED and not owner.done():
                    raise
                await self._discard(current)
                raise McpUnavailable(self._broken.pop(owner, reason_of(error))) from None
            except Exception as error:
                if not owner.done():
                    raise
                await self._discard(current)
                raise McpUnavailable(self._broken.pop(owner, reason_of(error))) from None
        call.cancel()
        # Its cancellation is this method's doing, not an outcome to report.
        await asyncio.gather(call, return_exceptions=True)
        if owner.done():
            await self._discard(current)
            raise McpUnavailable(self._broken.pop(owner, "the session was closed"))
        raise TimeoutError()

    async def _current(self, deadline: float) -> _Open:
        """The open session, or a new one (one opener at a time), before ``deadline``."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline), self._opening:
            current = self._open
            if current is not None:
                if not current.owner.done():
                    return current
                self._broken.pop(current.owner, None)
            self._open = None
            ready: asyncio.Future[Client] = loop.create_future()
            closing = asyncio.Event()
            # An empty context: the session belongs to no message (its log fields, its
            # span); each request runs in the context of the task that makes it.
            owner = loop.create_task(self._own(ready, closing), context=contextvars.Context())
            try:
                client = await asyncio.shield(ready)
            except BaseException:
                owner.cancel()
                await asyncio.gather(owner, return_exceptions=True)
                raise
            self._open = _Open(client, owner, closing)
            self.opened += 1
            log.info("mcp.session_opened", server=self.name, sessions=self.opened)
            return self._open

    async def _own(self, ready: asyncio.Future[Client], closing: asyncio.Event) -> None:
        """The owner task: open the client, hand it over, hold it until closed. It ends
        without raising; a session that broke leaves its reason in ``_broken``."""
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        # No read timeout of the connection's own: every request has its caller's.
        timeouts = httpx2.Timeout(CONNECT_TIMEOUT, read=None)
        try:
            async with (
                httpx2.AsyncClient(headers=headers, timeout=timeouts) as http,
                Client(
                    streamable_http_client(self.config.url, http_client=http),
                    mode=self._mode,
                    client_info=CLIENT_INFO,
                    # McpServers caches tool lists for a minute, whatever the server says.
                    cache=None,
                ) as client,
            ):
                ready.set_result(client)
                await closing.wait()
        except Exception as error:
            reason = reason_of(error)
            if not ready.done():
                ready.set_exception(McpUnavailable(reason))
                return
            task = asyncio.current_task()
            if task is not None:
                self._broken[task] = reason
            log.info("mcp.session_broken", server=self.name, error=reason)

    async def _discard(self, current: _Open) -> None:
        """Close ``current`` if it is still the session in use, and wait for its owner (a
        server that does not answer the session's goodbye is left after ``CLOSE_TIMEOUT``)."""
        async with self._opening:
            if self._open is current:
                self._open = None
        current.closing.set()
        done, _ = await asyncio.wait((current.owner,), timeout=CLOSE_TIMEOUT)
        if not done:
            current.owner.cancel()
            await asyncio.gather(current.owner, return_exceptions=True)

    async def close(self) -> None:
        """Close the session (at shutdown); a later request would open a new one."""
        current = self._open
        if current is not None:
            await self._discard(current)
        self._broken.clear()
