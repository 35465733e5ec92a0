"""A received message's lease: renewed at half-life while its handler runs.

Renewal, completion and release all change the pop receipt on the service, so they are
serialized by one lock and always use the newest receipt.
"""

import asyncio
import contextlib

import structlog

from worker.queues.transport import Delivery, LeaseLost, QueueTransport

log = structlog.get_logger("worker.queues.lease")

# Seconds between renewal attempts after one failed.
RETRY_INTERVAL = 2.0


class Lease:
    """The newest ``Delivery`` of one message, and the task that keeps it leased."""

    def __init__(
        self, queue: QueueTransport, delivery: Delivery, visibility_timeout: float
    ) -> None:
        self.queue = queue
        self.delivery = delivery
        self.visibility_timeout = visibility_timeout
        self._lock = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None

    def start_renewal(self) -> None:
        """Renew the lease at half-life until ``stop_renewal``."""
        self._renewal = asyncio.create_task(self._keep_alive())

    async def stop_renewal(self) -> None:
        """Stop renewing. Taken under the lock, so a renewal in flight is never cut off
        between the service changing the pop receipt and us recording the new one."""
        if self._renewal is not None:
            async with self._lock:
                self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None

    async def _keep_alive(self) -> None:
        interval = max(self.visibility_timeout / 2, 0.5)
        # After a failed renewal, try again soon: waiting a whole half-life could let the
        # lease run out while the queue service was only briefly unreachable.
        retry = min(interval / 4, RETRY_INTERVAL)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                async with self._lock:
                    self.delivery = await self.queue.extend(self.delivery, self.visibility_timeout)
                delay = interval
            except LeaseLost:
                log.warning(
                    "lease.lost", message_id=self.delivery.message_id, queue=self.queue.name
                )
                return
            except Exception as error:
                # Keep trying: the lease may still be ours.
                delay = retry
                log.warning(
                    "lease.renew_failed",
                    message_id=self.delivery.message_id,
                    queue=self.queue.name,
                    error=f"{type(error).__name__}: {error}",
                )

    async def complete(self) -> None:
        """Delete the message (raises ``LeaseLost`` if someone else holds it now)."""
        async with self._lock:
            await self.queue.complete(self.delivery)

    async def release(self, delay: float) -> None:
        """Make the message visible again after ``delay`` seconds."""
        async with self._lock:
            await self.queue.release(self.delivery, delay)
