"""The storage gate: receiving pauses while the worker's own storage does not answer.

When the table or queue service is down or throttling, every request fails alike: retrying
them through the queue would only burn their attempts and dead-letter work that is fine. So a
handler that fails on storage reports it here; one probe tells a blip (the probe answers: the
message is retried as usual) from an outage (it does not: the gate closes). While the gate is
closed the loop receives nothing, the messages that hit the outage keep their leases and wait
in-process, and a probe runs every ``interval`` seconds; the first that answers opens the gate
and the waiting messages run again.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from worker.loop.errors import StorageUnavailable

Probe = Callable[[], Awaitable[None]]
Listener = Callable[[bool, str], None]

log = structlog.get_logger("worker.loop.outage")


def is_storage_failure(
    error: BaseException, own_setting: str, queue_unavailable: Callable[[BaseException], bool]
) -> bool:
    """Whether ``error`` says the worker's own storage (``own_setting``) did not answer.

    Table errors arrive classified (``StorageUnavailable`` names its setting); queue errors
    arrive as the queue service's client raised them, and its broker tells
    (``queue_unavailable``: a refused or dropped connection, a 5xx, or 429).
    """
    if isinstance(error, StorageUnavailable):
        return error.setting == own_setting
    return queue_unavailable(error)


class StorageGate:
    """Open while storage answers; closed from a confirmed outage until a probe answers."""

    def __init__(self, probe: Probe, *, interval: float = 2.0, timeout: float = 10.0) -> None:
        self._probe = probe
        self.interval = interval
        self.timeout = timeout
        self._open = asyncio.Event()
        self._open.set()
        self._listeners: list[Listener] = []
        self._prober: asyncio.Task[None] | None = None
        self._confirming: asyncio.Future[bool] | None = None
        self.closed_since: float | None = None
        self.outages = 0

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def subscribe(self, listener: Listener) -> None:
        """``listener(ok, reason)`` is called whenever the gate opens or closes."""
        self._listeners.append(listener)

    async def confirm_outage(self, error: BaseException) -> bool:
        """A handler failed on storage: True (and the gate closes) if a probe fails too.

        Concurrent reports share one probe, so an outage seen by sixteen handlers at once
        costs one request.
        """
        if not self.is_open:
            return True
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._probe_fails())
        if not await asyncio.shield(self._confirming):
            return False
        self._close(f"{type(error).__name__}: {error}".splitlines()[0][:300])
        return True

    async def check(self) -> bool:
        """Probe now (at start): close the gate if storage refuses or fails the probe. True
        if open. A probe that is only slow does not close it: the first handler that fails
        on storage will tell."""
        if not self.is_open:
            return False
        try:
            async with asyncio.timeout(self.timeout):
                await self._probe()
        except TimeoutError:
            return True
        except Exception as error:
            self._close(f"storage failed the start-up probe: {type(error).__name__}")
        return self.is_open

    async def wait_open(self, within: float, stopping: asyncio.Event) -> bool:
        """Wait until the gate opens (True), or ``within`` seconds pass or ``stopping`` is set."""
        if self.is_open:
            return True
        opened = asyncio.ensure_future(self._open.wait())
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({opened, stopped}, timeout=within, return_when="FIRST_COMPLETED")
        finally:
            opened.cancel()
            stopped.cancel()
        return self.is_open

    async def close(self) -> None:
        """Stop probing (at shutdown)."""
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None

    async def _probe_fails(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self._probe()
        except Exception as error:
            log.debug("storage.probe_failed", error=f"{type(error).__name__}: {error}")
            return True
        return False

    def _close(self, reason: str) -> None:
        if not self.is_open:
            return
        self._open.clear()
        self.closed_since = time.monotonic()
        self.outages += 1
        log.warning("storage.unavailable", reason=reason, probe_interval=self.interval)
        self._notify(False, reason)
        self._prober = asyncio.create_task(self._probe_until_open())

    async def _probe_until_open(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not await self._probe_fails():
                break
        down_for = time.monotonic() - (self.closed_since or time.monotonic())
        self.closed_since = None
        self._open.set()
        log.warning("storage.available", down_seconds=round(down_for, 1))
        self._notify(True, "storage answers again")

    def _notify(self, ok: bool, reason: str) -> None:
        for listener in self._listeners:
            try:
                listener(ok, reason)
            except Exception as error:  # a listener must not break the gate
                log.warning("storage.listener_failed", error=str(error))
