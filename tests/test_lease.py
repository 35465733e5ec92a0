"""Leases: renewed at half-life, and soon again after a renewal that failed."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from worker.queues.lease import Lease
from worker.queues.transport import Delivery

DELIVERY = Delivery("q", "m1", "receipt-0", 1, "{}")


class FlakyQueue:
    """A queue whose first lease renewal fails (the service was briefly unreachable)."""

    name = "q"

    def __init__(self) -> None:
        self.renewals: list[float] = []
        self.second = asyncio.Event()

    async def extend(self, delivery: Delivery, visibility_timeout: float) -> Delivery:
        self.renewals.append(asyncio.get_running_loop().time())
        if len(self.renewals) == 1:
            raise ConnectionError("connection reset")
        self.second.set()
        return replace(delivery, pop_receipt=f"receipt-{len(self.renewals)}")


def test_a_failed_renewal_is_retried_soon_not_a_half_life_later() -> None:
    """With a 4 s lease the renewals come every 2 s; after one fails the next try comes
    within a second, while the lease is still ours."""

    async def scenario() -> tuple[list[float], float, str]:
        queue = FlakyQueue()
        lease = Lease(queue, DELIVERY, visibility_timeout=4)  # type: ignore[arg-type]
        started = asyncio.get_running_loop().time()
        lease.start_renewal()
        try:
            await asyncio.wait_for(queue.second.wait(), timeout=3.5)
        finally:
            await lease.stop_renewal()
        return queue.renewals, started, lease.delivery.pop_receipt

    renewals, started, receipt = asyncio.run(scenario())
    first, second = renewals[0] - started, renewals[1] - started
    assert 1.9 <= first <= 2.5
    assert second - first <= 1.1, "retried within a second, before the 4 s lease runs out"
    assert receipt == "receipt-2", "the new pop receipt is kept"
