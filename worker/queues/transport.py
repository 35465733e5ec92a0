"""The queue seam: what the worker loop needs from a queue service, and nothing more.

A ``Delivery`` is one received message with its lease (pop receipt); the decoded request never
carries delivery details. ``Broker`` is implemented for Azure Storage queues
(``worker.queues.azure``) and in memory (``worker.queues.memory``) for fast loop tests.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

# The most messages one receive may return (Azure Storage's cap).
MAX_RECEIVE = 32


@dataclass(frozen=True)
class Delivery:
    """One leased message: its body and what is needed to extend, delete or release it."""

    queue: str
    message_id: str
    pop_receipt: str
    dequeue_count: int
    body: str
    inserted_on: datetime | None = None


class LeaseLost(Exception):
    """The message's lease expired and someone else may hold it now (stale pop receipt)."""


class QueueNotFound(Exception):
    """The queue does not exist."""


class QueueTransport(Protocol):
    """One work queue."""

    name: str

    async def receive(self, max_messages: int, visibility_timeout: float) -> list[Delivery]:
        """Lease up to ``max_messages`` visible messages (fewer, or none, is normal)."""

    async def extend(self, delivery: Delivery, visibility_timeout: float) -> Delivery:
        """Renew the lease; the returned delivery carries the new pop receipt."""

    async def complete(self, delivery: Delivery) -> None:
        """Delete the message. Raises ``LeaseLost`` if the pop receipt is stale."""

    async def release(self, delivery: Delivery, delay: float) -> None:
        """Make the message visible again after ``delay`` seconds."""

    async def approximate_count(self) -> int:
        """Messages in the queue, visible or not (used by burst mode to know it is done)."""

    async def peek(self, max_messages: int) -> list[Delivery]:
        """Up to ``max_messages`` (at most 32) visible messages from the front of the queue,
        without leasing them (``pop_receipt`` empty; ``dequeue_count`` 0 for a message no
        one has received yet)."""


class Broker(Protocol):
    """A queue service: work queues to consume and queues to send to."""

    def queue(self, name: str) -> QueueTransport:
        """The transport of one queue (cached)."""

    async def send(
        self,
        queue: str,
        body: str,
        *,
        delay: float = 0.0,
        time_to_live: int | None = None,
        create_missing: bool = True,
    ) -> str:
        """Put a message, visible after ``delay`` seconds; returns its id.

        ``time_to_live=-1`` keeps it until it is deleted (dead letters). A queue that does not
        exist yet is created, unless ``create_missing`` is False: then ``QueueNotFound``.
        """

    def visible_after(self, delay: float) -> float:
        """Seconds after a send or release with ``delay`` until the message is visible (the
        poll schedule wakes then: Azure rounds delays up to whole seconds)."""

    async def ensure_queues(self, names: Iterable[str]) -> None:
        """Create the queues that do not exist."""

    def unavailable(self, error: BaseException) -> bool:
        """Whether ``error``, raised by this broker or its queues, says the queue service did
        not answer or is busy (not that it refused the request): the loop's storage gate."""

    async def close(self) -> None:
        """Release connections."""
