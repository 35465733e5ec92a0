"""The event loop's lag (``assistant_worker_event_loop_lag_seconds``, ``event_loop.lagging``).

Everything a worker does runs on one event loop: leases are renewed, probes answered, every
in-flight message moves. A callback that holds the loop (a regression, a message that costs
more than it should) stops all of it, and nothing else would say so. The monitor asks for a
timer every ``interval`` seconds and records how late it fired; a lag above ``warn_after``
is also logged (once the loop runs again: a loop held for good cannot report itself, but
``/healthz`` then stops answering).
"""

import asyncio
import contextlib
from collections.abc import Callable

import structlog

# Seconds between two samples: often enough to catch a stall of a fraction of a second.
LAG_INTERVAL = 0.25
# A lag above this many seconds is logged as ``event_loop.lagging``.
LAG_WARNING = 1.0

_log = structlog.get_logger("worker")


def lag_of(asked_at: float, woke_at: float, interval: float) -> float:
    """How late a timer asked at ``asked_at`` for ``interval`` seconds fired (never < 0)."""
    return max(woke_at - asked_at - interval, 0.0)


class LagMonitor:
    """Samples the lag of the running loop until stopped; ``observe`` gets every sample
    (the metric; None when metrics are off: only the warnings are logged)."""

    def __init__(
        self,
        observe: Callable[[float], None] | None = None,
        *,
        interval: float = LAG_INTERVAL,
        warn_after: float = LAG_WARNING,
    ) -> None:
        self._observe = observe
        self._interval = interval
        self._warn_after = warn_after
        self._task: asyncio.Task[None] | None = None
        # The largest lag seen so far (seconds), for tests and diagnostics.
        self.max_lag = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self._interval)
            self.record(lag_of(asked, loop.time(), self._interval))

    def record(self, lag: float) -> None:
        """One sample: to the metric, and to the log when it is over the threshold."""
        self.max_lag = max(self.max_lag, lag)
        if self._observe is not None:
            self._observe(lag)
        if lag > self._warn_after:
            _log.warning(
                "event_loop.lagging",
                lag_seconds=round(lag, 3),
                threshold_seconds=self._warn_after,
            )
