"""The queue depth gauge (``assistant_worker_queue_depth``), refreshed in the background."""

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from worker.observability.metrics import Metrics
from worker.queues.transport import Broker

_log = structlog.get_logger("worker.http")


class DepthPoller:
    """Refreshes ``assistant_worker_queue_depth`` every ``interval`` seconds until stopped."""

    def __init__(
        self, broker: Broker, queues: Sequence[str], metrics: Metrics, interval: float
    ) -> None:
        self._broker = broker
        self._queues = list(queues)
        self._metrics = metrics
        self._interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.refreshed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-depth")

    async def refresh(self) -> None:
        for name in self._queues:
            try:
                count = await self._broker.queue(name).approximate_count()
            except Exception as error:  # a missing or unreachable queue: keep the last value
                _log.debug("queue_depth.failed", queue=name, error=type(error).__name__)
                continue
            self._metrics.set_queue_depth(name, count)
        self.refreshed.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
