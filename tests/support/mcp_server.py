"""A real MCP server for the tests, the benchmark and the soak: built with the same SDK the worker
uses (``MCPServer`` over Streamable HTTP), started as a process of its own on a free port, so a
test can kill it, leave it down, and start it again on the same port.

Its tools:

- ``get_weather(city)``: read-only (its annotations say so), answers at once;
- ``send_email(to, subject)``: neither read-only nor idempotent (a call must not run twice);
- ``slow(seconds, label)``: sleeps, then answers (a server too slow for the worker's timeout;
  a call a crash interrupts is not run again);
- ``slow_lookup(seconds, label)``: the same, read-only (a call a crash interrupts runs again);
- ``broken()``: fails as a tool (``isError``), the server itself is fine;
- ``chaos_remote(tag)``: answers ``ok <tag>`` (the chaos soak's MCP tool, not safe to repeat).

Every execution appends ``{"tool", "event": "start"|"end", "key", "tag", "pid", "t"}`` to
``--tool-log`` (the format of ``tests.support.runs.ToolLog`` and of the chaos soak's tool log,
whose audit counts the executions of each tag), and every HTTP request to ``/mcp`` appends
``{"method", "authorized"}`` (its JSON-RPC method, and whether it carried the expected bearer
token, never the header itself) to ``--request-log``. With ``--token``, a request without
``Authorization: Bearer <token>`` is refused with 401.

``python -m tests.support.mcp_server --port N [--token T] [--tool-log F] [--request-log F]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2

from tests.support.azurite import REPO_ROOT
from worker.devtools.azurite import die_with_parent

SERVER_NAME = "weather"
FORECAST = {"city": "Seattle, WA", "forecast": "70 degrees and sunny"}
READY_TIMEOUT = 20.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def _append(path: str | None, entry: dict[str, Any]) -> None:
    """One JSON line; O_APPEND keeps lines whole across processes."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def forecast(city: str) -> dict[str, str]:
    """What ``get_weather`` answers (a local tool returning the same is the benchmark's baseline)."""
    return {**FORECAST, "city": city}


def build_server(tool_log: str | None) -> Any:
    """The MCP server with its tools (imported here: only this process needs the server)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response

    server = MCPServer(SERVER_NAME, log_level="WARNING")

    def log(tool: str, event: str, key: str) -> None:
        entry = {"tool": tool, "event": event, "key": key, "tag": key, "pid": os.getpid()}
        _append(tool_log, {**entry, "t": time.time()})

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def get_weather(city: str) -> dict[str, str]:
        """The current weather in a city."""
        log("get_weather", "start", city)
        log("get_weather", "end", city)
        return forecast(city)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, idempotent_hint=False))
    async def send_email(to: str, subject: str) -> str:
        """Send an email (not safe to send twice)."""
        log("send_email", "start", subject)
        await asyncio.sleep(0)
        log("send_email", "end", subject)
        return f"sent {subject!r} to {to}"

    @server.tool()
    async def slow(seconds: float, label: str = "") -> str:
        """Answer after ``seconds``."""
        log("slow", "start", label)
        await asyncio.sleep(seconds)
        log("slow", "end", label)
        return f"slept {seconds:g} s"

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def slow_lookup(seconds: float, label: str = "") -> str:
        """Look something up, slowly (safe to run again)."""
        log("slow_lookup", "start", label)
        await asyncio.sleep(seconds)
        log("slow_lookup", "end", label)
        return f"looked up {label}"

    @server.tool()
    def broken() -> str:
        """Always fails."""
        raise ToolError("the weather station is offline")

    @server.tool()
    def chaos_remote(tag: str) -> str:
        """Record one execution of the call tagged ``tag`` and return ``ok <tag>``."""
        log("chaos_remote", "start", tag)
        log("chaos_remote", "end", tag)
        return f"ok {tag}"

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    server.custom_route("/healthz", methods=["GET"])(healthz)

    return server


def recording(app: Asgi, token: str | None, request_log: str | None) -> Asgi:
    """Wrap the server's ASGI app: log each /mcp request's JSON-RPC method and whether it was
    authorized, and refuse it with 401 when a token is required and missing or wrong."""
    expected = f"Bearer {token}".encode() if token else None

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/mcp"):
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorized = expected is None or headers.get(b"authorization") == expected
        body = b""
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method: str | None = None
        with contextlib.suppress(ValueError, AttributeError):
            method = json.loads(body).get("method") if body else None
        _append(
            request_log,
            {"http": scope.get("method"), "method": method, "authorized": authorized},
        )
        if not authorized:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await app(scope, replay, send)

    return wrapped


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token")
    parser.add_argument("--tool-log")
    parser.add_argument("--request-log")
    args = parser.parse_args(argv)
    server = build_server(args.tool_log)
    app = recording(server.streamable_http_app(), args.token, args.request_log)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# --- the process, for tests ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class McpServerProcess:
    """The test server as a process on a fixed free port: ``start``, ``kill``, ``start`` again.

    A context manager: on exit the process is killed and reaped."""

    def __init__(
        self, directory: Path, *, token: str | None = None, tool_log: Path | None = None
    ) -> None:
        self.port = free_port()
        self.token = token
        self.tool_log = tool_log or directory / f"mcp-tools-{self.port}.jsonl"
        self.request_log = directory / f"mcp-requests-{self.port}.jsonl"
        self.output = directory / f"mcp-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def env(self, name: str = SERVER_NAME) -> dict[str, str]:
        """Settings that allow this server to the worker under ``name``."""
        values = {"WORKER_MCP_SERVERS": name, f"{name}__url": self.url}
        if self.token:
            values[f"{name}__token"] = self.token
        return values

    def start(self) -> McpServerProcess:
        """Start the process and wait until it answers (bounded)."""
        self.launch()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.answers():
            if not self.running or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"the MCP test server did not start on port {self.port}: "
                    f"{self.output.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start the process without waiting for it (``answers`` says when it does)."""
        command = [sys.executable, "-m", "tests.support.mcp_server", "--port", str(self.port)]
        command += ["--tool-log", str(self.tool_log), "--request-log", str(self.request_log)]
        if self.token:
            command += ["--token", self.token]
        with self.output.open("ab") as output:
            self.proc = subprocess.Popen(
                command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                preexec_fn=die_with_parent,
            )  # fmt: skip

    def answers(self) -> bool:
        """Whether the server answers HTTP (its health route)."""
        try:
            response = httpx2.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1.0)
        except httpx2.HTTPError:
            return False
        return response.status_code == 200

    def kill(self) -> None:
        """SIGKILL (a server that dies, not one that shuts down) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        return _read_lines(self.request_log)

    def methods(self) -> list[str]:
        """The JSON-RPC methods of the requests received so far, in order."""
        return [str(r["method"]) for r in self.requests() if r.get("method")]

    def sessions_opened(self) -> int:
        """How many sessions clients opened: one handshake (``server/discover`` on the
        2026 protocol, ``initialize`` before it) per session."""
        return sum(1 for m in self.methods() if m in ("server/discover", "initialize"))

    def executions(self, tool: str, event: str = "end") -> list[str]:
        """The keys of the executions of ``tool`` (``start``: begun, ``end``: finished)."""
        return [
            str(e["key"])
            for e in _read_lines(self.tool_log)
            if e["tool"] == tool and e["event"] == event
        ]

    def __enter__(self) -> McpServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    return entries


if __name__ == "__main__":
    main()
