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
import subprocess
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
    ) -> None:
        """``location`` keeps the data (else a temp folder, removed on stop); ``ports`` are
        (blob, queue, table), 0 meaning a free port."""
        self._binary = binary
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
