"""An HTTP proxy in front of one Azurite service that breaks chosen requests, for tests.

Where ``TcpProxy`` cuts everything, this one picks requests by method and path, so a test can
break exactly the request a defect is about: the send of a deadline message, a table
transaction, and not the reads around them. A rule does one of:
- ``fail``: answer ``status`` (503 by default) without forwarding: the service refused it;
- ``reset``: close the connection without forwarding or answering;
- ``hold``: answer nothing until ``release()``, then close the connection: the request never
  reaches the service (a request in flight when its worker is killed);
- ``lose_answer``: forward the request (the service applies it), then close the connection
  instead of answering: the client cannot know whether it landed.
Each rule lets its first ``skip`` matching requests through, then fires for the next ``count``;
a rule with ``after`` is armed only once that rule has fired all its times. Real HTTP to real Azurite: the worker
under test sees what a real network or service fault would show it.

The proxy runs its own event loop in a thread, so sync tests and any other loop can use it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import aiohttp
from aiohttp import web

Action = Literal["fail", "reset", "hold", "lose_answer"]
# Hop-by-hop and framing headers the proxy does not copy (aiohttp sets its own).
_SKIP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class Rule:
    """Break the first ``count`` requests whose method is ``method`` (any when None) and whose
    path and query match ``path`` (a regular expression searched in ``/account/queue/...``)."""

    action: Action
    path: str
    method: str | None = None
    count: int = 1
    status: int = 503
    skip: int = 0
    after: Rule | None = None
    seen: int = 0
    fired: int = 0
    fired_event: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.fired >= self.count

    def matches(self, method: str, path_qs: str) -> bool:
        if self.after is not None and not self.after.done:
            return False
        if self.method is not None and method.upper() != self.method.upper():
            return False
        return re.search(self.path, path_qs) is not None


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, breaking what the rules say."""

    def __init__(self, target_port: int) -> None:
        self.target = f"http://127.0.0.1:{target_port}"
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._held: asyncio.Event | None = None
        self._port: int | None = None
        self._error: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def port(self) -> int:
        assert self._port is not None, "the proxy is not started"
        return self._port

    def add(
        self,
        action: Action,
        path: str,
        *,
        method: str | None = None,
        count: int = 1,
        status: int = 503,
        skip: int = 0,
        after: Rule | None = None,
    ) -> Rule:
        rule = Rule(action, path, method, count, status, skip, after)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule and answer held requests (by forwarding them)."""
        with self._lock:
            self._rules.clear()
        self.release()

    def release(self) -> None:
        """Let every held request go on (forwarded now)."""
        loop, held = self._loop, self._held
        if loop is not None and held is not None:
            loop.call_soon_threadsafe(held.set)

    def _rule_for(self, method: str, path_qs: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.done or not rule.matches(method, path_qs):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                rule.fired += 1
                rule.fired_event.set()
                return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None and self._held is not None
        body = await request.read()
        rule = self._rule_for(request.method, request.path_qs)
        if rule is not None and rule.action == "fail":
            return web.Response(status=rule.status, text="fault injected by the test proxy")
        if rule is not None and rule.action == "reset":
            _abort(request)
            return web.Response(status=500)
        if rule is not None and rule.action == "hold":
            await self._held.wait()
            _abort(request)
            return web.Response(status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        # Headers the client did not send must not be added: they are signed (SharedKey).
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=body or None,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent", "Accept"),
        ) as upstream:
            payload = await upstream.read()
            if rule is not None and rule.action == "lose_answer":
                _abort(request)
                return web.Response(status=500)
            answer_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIP}
            return web.Response(status=upstream.status, headers=answer_headers, body=payload)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._held = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(runner.addresses[0][1])
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._held.set()
            await runner.cleanup()
            await self._session.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._ready.set()
        finally:
            loop.close()

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        if self._error is not None:
            raise RuntimeError("the fault proxy failed to start") from self._error
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _abort(request: web.Request) -> None:
    """Close the client's connection at once, with nothing answered."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def with_endpoint(connection_string: str, service: Literal["Queue", "Table"], port: int) -> str:
    """``connection_string`` with the queue or table endpoint moved to ``127.0.0.1:port``."""
    return re.sub(
        rf"{service}Endpoint=http://[^:/;]+:\d+/",
        f"{service}Endpoint=http://127.0.0.1:{port}/",
        connection_string,
    )
