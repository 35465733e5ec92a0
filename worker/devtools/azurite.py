"""Start Azurite (the Azure Storage emulator, from the repo's node_modules) for tests and the demo.

Tests use a throwaway instance on free ports; ``make run`` a persistent one on the default ports.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BIN = Path("node_modules") / ".bin" / "azurite"

DEV_ACCOUNT_NAME = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
HOST = "127.0.0.1"

_LISTENING_RE = re.compile(
    r"Azurite (Blob|Queue|Table) service is successfully listening at https?://[^\s:]+:(\d+)"
)
_SERVICES = ("blob", "queue", "table")


class AzuriteNotInstalledError(RuntimeError):
    """node_modules/.bin/azurite is missing: `npm ci` has not been run."""


def find_azurite_binary(repo_root: Path | None = None) -> Path:
    """Return the repo-local Azurite launcher or raise AzuriteNotInstalledError."""
    root = REPO_ROOT if repo_root is None else repo_root
    binary = root / AZURITE_BIN
    if not binary.is_file():
        raise AzuriteNotInstalledError(
            f"Azurite not found at {binary}. Run `make test` (it runs `npm ci`), "
            f"or `npm ci` in {root}, to install the pinned Azurite from package-lock.json."
        )
    return binary


def build_connection_string(
    *, blob_port: int, queue_port: int, table_port: int, host: str = HOST
) -> str:
    """Explicit dev-account connection string for the given endpoint ports."""
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={DEV_ACCOUNT_NAME};"
        f"AccountKey={DEV_ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT_NAME};"
        f"QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT_NAME};"
        f"TableEndpoint=http://{host}:{table_port}/{DEV_ACCOUNT_NAME};"
    )


class Azurite:
    """An Azurite process with disk persistence in a temp folder and OS-chosen ports.

    Use as a context manager, or call start() / stop().
    """

    account_name = DEV_ACCOUNT_NAME
    account_key = DEV_ACCOUNT_KEY
    host = HOST

    def __init__(
        self,
        *,
        binary: Path | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        location: Path | None = None,
        ports: tuple[int, int, int] = (0, 0, 0),
        debug_log: Path | None = None,
    ) -> None:
        """``location`` keeps the data (else a temp folder, removed on stop); ``ports`` are
        (blob, queue, table), 0 meaning a free port; ``debug_log``: Azurite's ``--debug`` file,
        one line per request among others (benchmarks count storage requests from it)."""
        self._binary = binary
        self._debug_log = debug_log
        self._keep_location = location
        self._requested_ports = ports
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._location: Path | None = None
        # Silent mode prints ~6 lines; the cap only guards against a chatty failure.
        self._lines: collections.deque[str] = collections.deque(maxlen=5000)
        self._ports: dict[str, int] = {}
        self._cond = threading.Condition()
        self.startup_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Azurite:
        """Launch Azurite and block until all three services report their ports."""
        if self._proc is not None:
            raise RuntimeError("Azurite already started")
        binary = self._binary if self._binary is not None else find_azurite_binary()
        if self._keep_location is not None:
            self._keep_location.mkdir(parents=True, exist_ok=True)
            self._location = self._keep_location
        else:
            self._location = Path(tempfile.mkdtemp(prefix="azurite-"))
        blob_port, queue_port, table_port = (str(port) for port in self._requested_ports)
        cmd = [
            str(binary),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--location",
            str(self._location),
            "--blobHost",
            HOST,
            "--queueHost",
            HOST,
            "--tableHost",
            HOST,
            "--blobPort",
            blob_port,
            "--queuePort",
            queue_port,
            "--tablePort",
            table_port,
        ]
        if self._debug_log is not None:
            cmd += ["--debug", str(self._debug_log)]
        began = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,  # own process group, so stop() can signal all of it
            )
        except BaseException:
            self._remove_location()
            raise
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._drain, args=(self._proc.stdout,), name="azurite-stdout", daemon=True
        )
        self._reader.start()
        try:
            self._wait_for_ports(began + self._startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after stop_timeout, remove the folder."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                # Azurite can ignore SIGTERM (e.g. stuck in its GC); the leader is not
                # reaped yet, so the group id still belongs to our process.
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=self._stop_timeout)
        reader_done = True
        if self._reader is not None:
            self._reader.join(timeout=self._stop_timeout)
            reader_done = not self._reader.is_alive()
            self._reader = None
        # Closing a stream another thread is still reading would block on its lock.
        if proc is not None and proc.stdout is not None and reader_done:
            proc.stdout.close()
        self._remove_location()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- endpoints -------------------------------------------------------------------

    @property
    def blob_port(self) -> int:
        """Port of the blob service."""
        return self._port("blob")

    @property
    def queue_port(self) -> int:
        """Port of the queue service."""
        return self._port("queue")

    @property
    def table_port(self) -> int:
        """Port of the table service."""
        return self._port("table")

    @property
    def connection_string(self) -> str:
        """Explicit dev-account connection string pointing at this instance."""
        return self.connection_string_with()

    def connection_string_with(
        self,
        queue_port: int | None = None,
        table_port: int | None = None,
        *,
        blob_port: int | None = None,
    ) -> str:
        """Connection string with some endpoints moved to other ports (e.g. a proxy)."""
        return build_connection_string(
            blob_port=self.blob_port if blob_port is None else blob_port,
            queue_port=self.queue_port if queue_port is None else queue_port,
            table_port=self.table_port if table_port is None else table_port,
        )

    # -- introspection ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        if self._proc is None:
            raise RuntimeError("Azurite not started")
        return self._proc.pid

    @property
    def location(self) -> Path:
        """Folder holding Azurite's data; removed by stop()."""
        if self._location is None:
            raise RuntimeError("Azurite not started")
        return self._location

    @property
    def running(self) -> bool:
        """True while the Azurite process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def output(self) -> str:
        """Everything Azurite printed so far (stdout and stderr)."""
        with self._cond:
            return "".join(self._lines)

    # -- internals -------------------------------------------------------------------

    def _port(self, service: str) -> int:
        with self._cond:
            port = self._ports.get(service)
        if port is None:
            raise RuntimeError(f"Azurite {service} port unknown: not started")
        return port

    def _drain(self, stream: IO[str]) -> None:
        # Runs for the whole life of the process so the pipe never fills up.
        try:
            for line in stream:
                with self._cond:
                    self._lines.append(line)
                    match = _LISTENING_RE.search(line)
                    if match:
                        self._ports[match.group(1).lower()] = int(match.group(2))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # stream closed by stop()
        finally:
            with self._cond:
                self._cond.notify_all()

    def _wait_for_ports(self, deadline: float) -> None:
        assert self._proc is not None
        with self._cond:
            while not all(s in self._ports for s in _SERVICES):
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"Azurite exited with code {self._proc.returncode} before listening. "
                        f"Output:\n{''.join(self._lines)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"Azurite did not report blob/queue/table ports within "
                        f"{self._startup_timeout:.0f} s (got {self._ports}). "
                        f"Output so far:\n{''.join(self._lines)}"
                    )
                # Bounded slice: process exit is noticed via poll(), not a notify.
                self._cond.wait(timeout=min(remaining, 0.2))

    @staticmethod
    def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _remove_location(self) -> None:
        if self._location is not None and self._keep_location is None:
            shutil.rmtree(self._location, ignore_errors=True)


# -- queue and table services as separate processes -------------------------------------

AZURITE_QUEUE_BIN = Path("node_modules") / ".bin" / "azurite-queue"
AZURITE_TABLE_BIN = Path("node_modules") / ".bin" / "azurite-table"

# azurite-queue prints the bound port; azurite-table prints the port it was given (0 stays 0).
_SPLIT_READY_RE = {
    "queue": re.compile(r"Azurite Queue service successfully listens on https?://[^\s:]+:(\d+)"),
    "table": re.compile(r"Azurite Table service successfully started on [^\s:]+:(\d+)"),
}
_ADDRESS_IN_USE = "EADDRINUSE"


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when the thread that started it dies (Linux),
    so that a SIGKILLed harness leaves no process behind. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _ServiceProcess:
    """One Azurite service (``azurite-queue`` or ``azurite-table``) as its own process group."""

    def __init__(
        self,
        service: str,
        binary: Path,
        location: Path,
        *,
        startup_timeout: float,
        stop_timeout: float,
        tied: bool = False,
    ) -> None:
        self.service = service
        self.binary = binary
        self.location = location
        self.port: int | None = None  # fixed after the first start, so restarts keep it
        self._tied = tied
        # How the last stop went: "graceful", "killed", or "killed after the stop timeout".
        self.last_stop: str | None = None
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=5000)
        self._ready_port: int | None = None
        self._cond = threading.Condition()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"Azurite {self.service} service already running")
        attempts = 1 if self.port is not None or self.service == "queue" else 5
        for attempt in range(attempts):
            port = self.port
            if port is None:
                # azurite-table cannot report a port it chose itself: pick one (retry on a race).
                port = 0 if self.service == "queue" else _free_port()
            try:
                self._launch(port)
                return
            except _PortInUseError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, port: int) -> None:
        cmd = [
            str(self.binary),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--location",
            str(self.location),
            f"--{self.service}Host",
            HOST,
            f"--{self.service}Port",
            str(port),
        ]
        with self._cond:
            self._ready_port = None
            self._lines.clear()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=die_with_parent if self._tied else None,
        )
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._drain,
            args=(self._proc.stdout,),
            name=f"azurite-{self.service}-stdout",
            daemon=True,
        )
        self._reader.start()
        deadline = time.monotonic() + self._startup_timeout
        proc = self._proc
        while True:
            with self._cond:
                ready = self._ready_port
                output = "".join(self._lines)
                if ready is None and proc.poll() is None:
                    self._cond.wait(timeout=0.2)  # bounded: an exit is seen by poll()
                    continue_waiting = True
                else:
                    continue_waiting = False
            if ready is not None:
                self.port = ready if ready else port
                return
            if not continue_waiting:
                self._reap()
                if _ADDRESS_IN_USE in output:
                    raise _PortInUseError(output)
                raise RuntimeError(
                    f"azurite-{self.service} exited with code {proc.returncode} before "
                    f"listening. Output:\n{output}"
                )
            if time.monotonic() >= deadline:
                self.stop(kill=True)
                raise RuntimeError(
                    f"azurite-{self.service} did not report listening within "
                    f"{self._startup_timeout:.0f} s. Output:\n{output}"
                )

    def stop(self, *, kill: bool = False) -> None:
        """SIGINT (both services save their data and close on it) or SIGKILL; reap.

        Azurite saves its databases every 5 s and on a graceful close: a SIGKILL can lose the
        last seconds of writes (a crash, not an outage). SIGTERM is not used: azurite-table has
        no handler for it and would die without saving.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.last_stop = "killed" if kill else "graceful"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGINT)
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                # Did not close in time: killed, and what it had not saved is lost.
                self.last_stop = "killed after the stop timeout"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self._stop_timeout)
        # A graceful close leaves children (none known) or a killed leader's group behind.
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self._stop_timeout)
        reader_done = True
        if self._reader is not None:
            self._reader.join(timeout=self._stop_timeout)
            reader_done = not self._reader.is_alive()
            self._reader = None
        if proc.stdout is not None and reader_done:
            proc.stdout.close()
        self._proc = None

    def _drain(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._cond:
                    self._lines.append(line)
                    match = _SPLIT_READY_RE[self.service].search(line)
                    if match:
                        self._ready_port = int(match.group(1))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._cond.notify_all()


class _PortInUseError(RuntimeError):
    pass


class SplitAzurite(Azurite):
    """Azurite's queue and table services as two processes on one ``--location``.

    Lets a test fail the table service alone (a partial outage) while queues keep working:
    ``stop_table()`` then ``start_table()`` (same port, same data folder: the data survives).
    ``stop_queue()`` / ``start_queue()`` likewise. No blob service. A subclass of ``Azurite`` so
    that code typed for it (``StorageEnv``) takes one; its blob endpoint does not exist.
    """

    def __init__(
        self,
        *,
        repo_root: Path | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        location: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """``die_with_parent``: the services get SIGKILL when the thread that started them
        dies (Linux), for harnesses that must leave nothing behind even when killed."""
        super().__init__(
            startup_timeout=startup_timeout, stop_timeout=stop_timeout, location=location
        )
        self._repo_root = REPO_ROOT if repo_root is None else repo_root
        self._queue: _ServiceProcess | None = None
        self._table: _ServiceProcess | None = None
        self._tied = die_with_parent

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SplitAzurite:
        """Start both services; block until each listens."""
        if self._queue is not None:
            raise RuntimeError("SplitAzurite already started")
        for relative in (AZURITE_QUEUE_BIN, AZURITE_TABLE_BIN):
            binary = self._repo_root / relative
            if not binary.is_file():
                raise AzuriteNotInstalledError(
                    f"{binary} not found: run `npm ci` in {self._repo_root} (or `make test`)."
                )
        if self._keep_location is not None:
            self._keep_location.mkdir(parents=True, exist_ok=True)
            self._location = self._keep_location
        else:
            self._location = Path(tempfile.mkdtemp(prefix="azurite-split-"))
        began = time.monotonic()
        self._queue = _ServiceProcess(
            "queue",
            self._repo_root / AZURITE_QUEUE_BIN,
            self._location,
            startup_timeout=self._startup_timeout,
            stop_timeout=self._stop_timeout,
            tied=self._tied,
        )
        self._table = _ServiceProcess(
            "table",
            self._repo_root / AZURITE_TABLE_BIN,
            self._location,
            startup_timeout=self._startup_timeout,
            stop_timeout=self._stop_timeout,
            tied=self._tied,
        )
        try:
            self._queue.start()
            self._table.start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop both services (gracefully, then SIGKILL) and remove a temporary data folder."""
        for service in (self._table, self._queue):
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()
        self._remove_location()

    def __enter__(self) -> SplitAzurite:
        return self.start()

    def stop_table(self, *, kill: bool = False) -> None:
        """Stop the table service only: SIGINT (saves its data) or, with ``kill``, SIGKILL."""
        self._service("table").stop(kill=kill)

    def start_table(self) -> None:
        """Start the table service again on the same port and data folder."""
        self._service("table").start()

    def stop_queue(self, *, kill: bool = False) -> None:
        """Stop the queue service only (see ``stop_table``)."""
        self._service("queue").stop(kill=kill)

    def start_queue(self) -> None:
        """Start the queue service again on the same port and data folder."""
        self._service("queue").start()

    @property
    def table_last_stop(self) -> str | None:
        """How the table service last stopped (see ``_ServiceProcess.stop``)."""
        return self._service("table").last_stop

    @property
    def table_running(self) -> bool:
        return self._table is not None and self._table.running

    @property
    def queue_running(self) -> bool:
        return self._queue is not None and self._queue.running

    # -- endpoints -------------------------------------------------------------------

    @property
    def blob_port(self) -> int:
        raise RuntimeError("SplitAzurite runs no blob service")

    @property
    def queue_port(self) -> int:
        return self._service_port("queue")

    @property
    def table_port(self) -> int:
        return self._service_port("table")

    def connection_string_with(
        self,
        queue_port: int | None = None,
        table_port: int | None = None,
        *,
        blob_port: int | None = None,
    ) -> str:
        """Connection string with queue and table endpoints (no blob endpoint)."""
        queue = self.queue_port if queue_port is None else queue_port
        table = self.table_port if table_port is None else table_port
        blob = (
            ""
            if blob_port is None
            else f"BlobEndpoint=http://{HOST}:{blob_port}/{DEV_ACCOUNT_NAME};"
        )
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={DEV_ACCOUNT_NAME};"
            f"AccountKey={DEV_ACCOUNT_KEY};"
            f"{blob}"
            f"QueueEndpoint=http://{HOST}:{queue}/{DEV_ACCOUNT_NAME};"
            f"TableEndpoint=http://{HOST}:{table}/{DEV_ACCOUNT_NAME};"
        )

    # -- introspection ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Process id of the queue service."""
        pid = self._service("queue").pid
        if pid is None:
            raise RuntimeError("queue service not running")
        return pid

    @property
    def table_pid(self) -> int | None:
        return self._service("table").pid

    @property
    def running(self) -> bool:
        """True while both services run."""
        return self.queue_running and self.table_running

    @property
    def output(self) -> str:
        """What the running (or last) queue and table processes printed."""
        parts = [s.output for s in (self._queue, self._table) if s is not None]
        return "".join(parts)

    def _service(self, name: str) -> _ServiceProcess:
        service = self._queue if name == "queue" else self._table
        if service is None:
            raise RuntimeError("SplitAzurite not started")
        return service

    def _service_port(self, name: str) -> int:
        port = self._service(name).port
        if port is None:
            raise RuntimeError(f"Azurite {name} port unknown: not started")
        return port
