"""Reading poison queues under a lease, and giving back every message not deleted.

Azure's peek stops at 32 messages, so a whole poison queue is read by receiving it page by
page with a lease (which hides the messages from other readers meanwhile); whatever the
command did not delete is released at the end, so reading leaves the queue as it was.
"""

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from worker.config.settings import Settings
from worker.connections.clients import queue_service
from worker.deadletters.operations import DeadLetterItem, ordered
from worker.queues.azure import AzureQueueBroker
from worker.queues.transport import MAX_RECEIVE, Broker, Delivery, LeaseLost, QueueNotFound

# Seconds a read message stays hidden while the command works on it.
LEASE_SECONDS = 60
# A lease with less than this many seconds left is renewed before the message is moved.
LEASE_MARGIN = 20
# At most this many messages are read per command (a bound on every read loop).
MAX_READ = 5000
# Releases and deletes run this many at a time.
PARALLEL = 16


@dataclass(frozen=True)
class Leased:
    """A dead letter read from its poison queue, with the lease that hides it meanwhile."""

    item: DeadLetterItem
    delivery: Delivery
    leased_at: float


@dataclass
class ReadResult:
    leased: list[Leased]
    capped: bool = False

    @property
    def items(self) -> list[DeadLetterItem]:
        """Oldest first (see ``poison_ops.ordered``)."""
        return ordered(entry.item for entry in self.leased)


class PoisonReader:
    """Reads poison queues under a lease and gives back every message it did not delete."""

    def __init__(self, broker: Broker, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.clock = clock
        self._held: dict[tuple[str, str], Leased] = {}

    async def read(
        self,
        queues: Sequence[str],
        *,
        explicit: bool,
        wanted: Callable[[DeadLetterItem], bool] | None = None,
        need: int | None = None,
        max_read: int = MAX_READ,
    ) -> ReadResult:
        """Lease the messages of ``queues`` page by page, until each is empty, ``need``
        messages satisfy ``wanted``, or ``max_read`` messages were received."""
        order: list[tuple[str, str]] = []
        found = 0
        received = 0
        capped = False
        for name in queues:
            queue = self.broker.queue(name)
            # Bounded: every page received counts towards max_read.
            while True:
                if need is not None and found >= need:
                    break
                if received >= max_read:
                    capped = True
                    break
                try:
                    page = await queue.receive(min(MAX_RECEIVE, max_read - received), LEASE_SECONDS)
                except QueueNotFound:
                    if explicit:
                        raise QueueNotFound(f"queue {name!r} does not exist") from None
                    break
                if not page:
                    break
                received += len(page)
                now = self.clock()
                for delivery in page:
                    key = (name, delivery.message_id)
                    previous = self._held.get(key)
                    item = (
                        previous.item
                        if previous is not None
                        else DeadLetterItem.parse(
                            name, delivery.message_id, delivery.body, delivery.inserted_on
                        )
                    )
                    # A message seen again (its first lease ran out): keep its newest receipt.
                    self._held[key] = Leased(item, delivery, now)
                    if previous is None:
                        order.append(key)
                        if wanted is not None and wanted(item):
                            found += 1
        return ReadResult([self._held[key] for key in order], capped)

    async def renewed(self, entry: Leased) -> Leased:
        """The entry with at least ``LEASE_MARGIN`` seconds of lease left (LeaseLost if gone)."""
        current = self._held.get(lease_key(entry), entry)
        if self.clock() - current.leased_at < LEASE_SECONDS - LEASE_MARGIN:
            return current
        queue = self.broker.queue(current.item.poison_queue)
        delivery = await queue.extend(current.delivery, LEASE_SECONDS)
        fresh = replace(current, delivery=delivery, leased_at=self.clock())
        self._held[lease_key(entry)] = fresh
        return fresh

    async def delete(self, entry: Leased) -> None:
        """Delete a dead letter (renewing its lease first if it is about to run out)."""
        try:
            current = await self.renewed(entry)
            await self.broker.queue(current.item.poison_queue).complete(current.delivery)
        except LeaseLost:
            self._held.pop(lease_key(entry), None)
            raise
        self._held.pop(lease_key(entry), None)

    async def release(self, entries: Sequence[Leased] | None = None) -> int:
        """Make messages visible again (all held ones by default); returns how many failed."""
        keys = [lease_key(entry) for entry in entries] if entries is not None else list(self._held)
        targets = [self._held.pop(key) for key in keys if key in self._held]
        if not targets:
            return 0
        limiter = asyncio.Semaphore(PARALLEL)

        async def one(entry: Leased) -> bool:
            async with limiter:
                try:
                    await self.broker.queue(entry.item.poison_queue).release(entry.delivery, 0)
                except LeaseLost:
                    return True  # someone else holds it now: nothing of ours to give back
                except Exception:
                    return False
                return True

        results = await asyncio.gather(*(one(entry) for entry in targets))
        return results.count(False)


def lease_key(entry: Leased) -> tuple[str, str]:
    return (entry.item.poison_queue, entry.item.message_id)


@asynccontextmanager
async def open_reader(settings: Settings) -> AsyncIterator[PoisonReader]:
    """A reader whose held messages are all released on the way out, whatever happens."""
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    reader = PoisonReader(broker)
    try:
        yield reader
    finally:
        try:
            failed = await reader.release()
            if failed:
                print(
                    f"{failed} dead letter(s) could not be released: they reappear when their "
                    f"{LEASE_SECONDS} s lease ends",
                    file=sys.stderr,
                )
        finally:
            await broker.close()
