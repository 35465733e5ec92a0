"""An in-memory ``Broker`` with Azure queue semantics, for fast unit tests of the loop.

Leases, pop receipts, dequeue counts, visibility delays and stale-receipt failures behave as
on Azure Storage; time comes from an injectable clock. End-to-end tests use Azurite instead.
"""

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from worker.queues.transport import Delivery, LeaseLost, QueueNotFound


@dataclass
class StoredMessage:
    message_id: str
    body: str
    inserted_on: datetime
    visible_at: float
    expires_at: float | None
    dequeue_count: int = 0
    pop_receipt: str = ""


@dataclass
class MemoryQueue:
    """One queue; messages are kept in insertion order."""

    name: str
    clock: Callable[[], float]
    messages: dict[str, StoredMessage] = field(default_factory=dict)

    async def receive(self, max_messages: int, visibility_timeout: float) -> list[Delivery]:
        now = self.clock()
        leased: list[Delivery] = []
        for message in list(self.messages.values()):
            if len(leased) >= max_messages:
                break
            if message.expires_at is not None and message.expires_at <= now:
                del self.messages[message.message_id]
                continue
            if message.visible_at > now:
                continue
            message.dequeue_count += 1
            message.pop_receipt = uuid.uuid4().hex
            message.visible_at = now + visibility_timeout
            leased.append(self._delivery(message))
        return leased

    async def peek(self, max_messages: int) -> list[Delivery]:
        now = self.clock()
        visible = [m for m in self.messages.values() if m.visible_at <= now]
        return [
            Delivery(self.name, m.message_id, "", m.dequeue_count, m.body, m.inserted_on)
            for m in visible[:max_messages]
        ]

    def _delivery(self, message: StoredMessage) -> Delivery:
        return Delivery(
            queue=self.name,
            message_id=message.message_id,
            pop_receipt=message.pop_receipt,
            dequeue_count=message.dequeue_count,
            body=message.body,
            inserted_on=message.inserted_on,
        )

    def _leased(self, delivery: Delivery) -> StoredMessage:
        message = self.messages.get(delivery.message_id)
        if message is None or message.pop_receipt != delivery.pop_receipt:
            raise LeaseLost(f"message {delivery.message_id} is no longer leased by this worker")
        return message

    async def extend(self, delivery: Delivery, visibility_timeout: float) -> Delivery:
        message = self._leased(delivery)
        message.pop_receipt = uuid.uuid4().hex
        message.visible_at = self.clock() + visibility_timeout
        return self._delivery(message)

    async def complete(self, delivery: Delivery) -> None:
        self._leased(delivery)
        del self.messages[delivery.message_id]

    async def release(self, delivery: Delivery, delay: float) -> None:
        message = self._leased(delivery)
        message.pop_receipt = uuid.uuid4().hex
        message.visible_at = self.clock() + delay

    async def approximate_count(self) -> int:
        return len(self.messages)

    def put(self, body: str, *, delay: float = 0.0, time_to_live: int | None = None) -> str:
        now = self.clock()
        message_id = uuid.uuid4().hex
        expires = None if time_to_live == -1 else now + (time_to_live or 7 * 24 * 3600)
        self.messages[message_id] = StoredMessage(
            message_id=message_id,
            body=body,
            inserted_on=datetime.now(UTC),
            visible_at=now + delay,
            expires_at=expires,
        )
        return message_id

    def bodies(self) -> list[str]:
        """Every body in the queue, visible or not (test inspection)."""
        return [message.body for message in self.messages.values()]


class MemoryBroker:
    """Queues created on first use, as ``ensure_queues`` would on Azure."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.queues: dict[str, MemoryQueue] = {}

    def queue(self, name: str) -> MemoryQueue:
        if name not in self.queues:
            self.queues[name] = MemoryQueue(name, self.clock)
        return self.queues[name]

    async def send(
        self,
        queue: str,
        body: str,
        *,
        delay: float = 0.0,
        time_to_live: int | None = None,
        create_missing: bool = True,
    ) -> str:
        if not create_missing and queue not in self.queues:
            raise QueueNotFound(f"the queue {queue!r} does not exist")
        return self.queue(queue).put(body, delay=delay, time_to_live=time_to_live)

    def visible_after(self, delay: float) -> float:
        return max(delay, 0.0)

    async def ensure_queues(self, names: Iterable[str]) -> None:
        for name in names:
            self.queue(name)

    def unavailable(self, error: BaseException) -> bool:
        """The in-memory queues always answer."""
        return False

    async def close(self) -> None:
        return None
