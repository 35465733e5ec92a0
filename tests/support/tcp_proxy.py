"""Thread-based TCP proxy for fault injection in tests: outages and latency.

Threads rather than asyncio so it works from sync tests and alongside any event loop.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

_POLL = 0.1  # upper bound on how long any proxy thread blocks before rechecking flags
_CHUNK = 65536
_RST_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _reset(sock: socket.socket) -> None:
    """Abort a socket with RST so the peer gets an immediate connection error."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    sock.close()


class _Conn:
    """One proxied client connection and its upstream socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.cut = threading.Event()
        # Guards socket shutdown/close so a cut never touches an fd closed (and maybe reused).
        self._lock = threading.Lock()
        self._closed = False
        self._pumps_left = 2

    def attach_upstream(self, upstream: socket.socket) -> bool:
        """Attach the upstream socket; False (and upstream reset) if already cut."""
        with self._lock:
            if self.cut.is_set() or self._closed:
                _reset(upstream)
                return False
            self.upstream = upstream
            return True

    def cut_now(self) -> None:
        """Abort both sides; pump threads notice and the last one closes the sockets."""
        with self._lock:
            self.cut.set()
            if self._closed:
                return
            for sock in (self.client, self.upstream):
                if sock is None:
                    continue
                # shutdown() wakes the pump threads without freeing the fd under them.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def shutdown_write(self, sock: socket.socket) -> None:
        """Forward a half-close (FIN) to the other side."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close both sockets now (RST if the connection was cut)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for sock in (self.client, self.upstream):
                if sock is not None:
                    sock.close()

    def pump_done(self) -> bool:
        """Record a finished direction; True when both are finished (and sockets closed)."""
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self.close()
        return last


class TcpProxy:
    """Forward 127.0.0.1:<port> to target_host:target_port with switchable faults.

    set_down() and set_delay() are thread-safe and apply to new and existing connections.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
        join_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._connect_timeout = connect_timeout
        self._join_timeout = join_timeout
        self._lock = threading.Lock()
        self._down = False
        self._delay = 0.0
        self._accepted = 0
        self._rejected = 0
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Bind a free port and start accepting."""
        if self._listener is not None:
            raise RuntimeError("TcpProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, 0))
        listener.listen(128)
        listener.settimeout(_POLL)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tcp-proxy-accept-{self._port}", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every connection, join threads (bounded)."""
        self._stopping.set()
        deadline = time.monotonic() + self._join_timeout
        if self._acceptor is not None:
            self._acceptor.join(timeout=self._join_timeout)
        if self._listener is not None:
            self._listener.close()
        self.drop_connections()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- controls --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """Local port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("TcpProxy not started")
        return self._port

    def set_down(self, down: bool) -> None:
        """While down, reset new connections at once and cut the existing ones."""
        with self._lock:
            self._down = down
        if down:
            self.drop_connections()

    def set_delay(self, seconds: float) -> None:
        """Delay every forwarded chunk, in both directions, by this many seconds."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        with self._lock:
            self._delay = float(seconds)

    def drop_connections(self) -> int:
        """Cut every open connection (RST) without going down; return how many."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.cut_now()
        return len(conns)

    @property
    def down(self) -> bool:
        """Whether the proxy is simulating an outage."""
        with self._lock:
            return self._down

    @property
    def delay(self) -> float:
        """Current per-chunk delay in seconds."""
        with self._lock:
            return self._delay

    @property
    def connections_accepted(self) -> int:
        """Connections accepted so far, including those reset while down."""
        with self._lock:
            return self._accepted

    @property
    def connections_rejected(self) -> int:
        """Connections reset on arrival because the proxy was down."""
        with self._lock:
            return self._rejected

    @property
    def active_connections(self) -> int:
        """Connections currently being forwarded."""
        with self._lock:
            return len(self._conns)

    # -- internals -------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                continue
            with self._lock:
                self._accepted += 1
                down = self._down
                if down:
                    self._rejected += 1
            if down:
                _reset(client)
                continue
            client.settimeout(_POLL)
            conn = _Conn(client)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn, name=f"tcp-proxy-conn-{self._port}")

    def _serve(self, conn: _Conn) -> None:
        try:
            upstream = socket.create_connection(
                (self.target_host, self.target_port), timeout=self._connect_timeout
            )
        except OSError:
            conn.cut_now()
            conn.close()
            self._forget(conn)
            return
        upstream.settimeout(_POLL)
        if not conn.attach_upstream(upstream):
            conn.close()
            self._forget(conn)
            return
        self._spawn(self._pump, conn, upstream, conn.client, name=f"tcp-proxy-down-{self._port}")
        self._pump(conn, conn.client, upstream)

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not conn.cut.is_set() and not self._stopping.is_set():
                try:
                    readable, _, _ = select.select([src], [], [], _POLL)
                except (OSError, ValueError):
                    conn.cut_now()
                    break
                if not readable:
                    continue
                try:
                    data = src.recv(_CHUNK)
                except TimeoutError:
                    continue
                except OSError:
                    conn.cut_now()
                    break
                if not data:
                    if not conn.cut.is_set():
                        conn.shutdown_write(dst)
                    break
                delay = self.delay
                # Interruptible sleep: a cut or stop() ends it at once.
                if delay > 0 and conn.cut.wait(delay):
                    break
                if not self._send_all(conn, dst, data):
                    conn.cut_now()
                    break
        finally:
            if conn.pump_done():
                self._forget(conn)

    def _send_all(self, conn: _Conn, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if conn.cut.is_set() or self._stopping.is_set():
                return False
            try:
                sent = dst.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True
