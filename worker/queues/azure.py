"""The Azure Storage queue ``Broker`` (async clients).

Bodies are read and written as text, with no SDK encode/decode policy: the worker detects plain
JSON or Base64 per message itself (a Base64 decode policy fails a whole page on one plain
message, see NOTES).
"""

import asyncio
import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from worker.queues.transport import MAX_RECEIVE, Delivery, LeaseLost, QueueNotFound

# Queue names come from messages too (a post's replyTo), so the clients and the names known to
# exist are kept for the queues used last only: a client costs about 4 KB, a name ~100 bytes.
MAX_QUEUE_CLIENTS = 256
MAX_KNOWN_QUEUES = 4096


def _whole_seconds(value: float) -> int:
    return max(0, math.ceil(value))


def _is_stale_receipt(error: HttpResponseError) -> bool:
    # A stale pop receipt is 400 PopReceiptMismatch; a message someone already deleted is 404.
    code = getattr(error, "error_code", None)
    return error.status_code == 404 or code in {"PopReceiptMismatch", "MessageNotFound"}


class AzureQueue:
    """One Azure queue."""

    def __init__(self, client: QueueClient) -> None:
        self.client = client
        self.name: str = client.queue_name

    async def receive(self, max_messages: int, visibility_timeout: float) -> list[Delivery]:
        count = max(1, min(max_messages, MAX_RECEIVE))
        # One page, one request: iterated item by item, the pager asks for another page
        # whenever the first was not full (an empty second GET per receive), and without
        # max_messages it keeps leasing page after page.
        pages = self.client.receive_messages(
            messages_per_page=count,
            max_messages=count,
            visibility_timeout=max(1, _whole_seconds(visibility_timeout)),
        ).by_page()
        deliveries = []
        try:
            async for page in pages:
                deliveries.extend([self._delivery(message) async for message in page])
                break
        except ResourceNotFoundError:
            raise QueueNotFound(f"queue {self.name!r} does not exist") from None
        return deliveries

    def _delivery(self, message: Any) -> Delivery:
        return Delivery(
            queue=self.name,
            message_id=message.id,
            pop_receipt=message.pop_receipt or "",
            dequeue_count=message.dequeue_count or 1,
            body=message.content if isinstance(message.content, str) else str(message.content),
            inserted_on=message.inserted_on,
        )

    async def extend(self, delivery: Delivery, visibility_timeout: float) -> Delivery:
        try:
            # visibility_timeout must be given: left out, it is sent as 0 (visible at once).
            updated = await self.client.update_message(
                delivery.message_id,
                delivery.pop_receipt,
                visibility_timeout=_whole_seconds(visibility_timeout),
            )
        except HttpResponseError as error:
            if _is_stale_receipt(error):
                raise LeaseLost(str(error)) from error
            raise
        return Delivery(
            queue=delivery.queue,
            message_id=delivery.message_id,
            pop_receipt=updated.pop_receipt or "",
            dequeue_count=delivery.dequeue_count,
            body=delivery.body,
            inserted_on=delivery.inserted_on,
        )

    async def complete(self, delivery: Delivery) -> None:
        try:
            await self.client.delete_message(delivery.message_id, delivery.pop_receipt)
        except HttpResponseError as error:
            if _is_stale_receipt(error):
                raise LeaseLost(str(error)) from error
            raise

    async def release(self, delivery: Delivery, delay: float) -> None:
        try:
            await self.client.update_message(
                delivery.message_id, delivery.pop_receipt, visibility_timeout=_whole_seconds(delay)
            )
        except HttpResponseError as error:
            if _is_stale_receipt(error):
                raise LeaseLost(str(error)) from error
            raise

    async def approximate_count(self) -> int:
        properties = await self.client.get_queue_properties()
        return int(properties.approximate_message_count or 0)

    async def peek(self, max_messages: int) -> list[Delivery]:
        try:
            peeked = await self.client.peek_messages(
                max_messages=max(1, min(max_messages, MAX_RECEIVE))
            )
        except ResourceNotFoundError:
            raise QueueNotFound(f"queue {self.name!r} does not exist") from None
        return [
            replace(
                self._delivery(message), pop_receipt="", dequeue_count=message.dequeue_count or 0
            )
            for message in peeked
        ]


class AzureQueueBroker:
    """Queues of one storage account; clients are cached per queue name, for the
    ``max_queues`` queues used last.

    Dropping a client needs no close: a queue client made by the service sends through the
    service's transport (which the SDK wraps so that closing the queue client leaves it open),
    so a sender still holding an evicted client goes on working, and the client is freed once
    nobody holds it.
    """

    def __init__(
        self,
        service: QueueServiceClient,
        *,
        max_queues: int = MAX_QUEUE_CLIENTS,
        max_known: int = MAX_KNOWN_QUEUES,
    ) -> None:
        self.service = service
        self._max_queues = max(1, max_queues)
        self._max_known = max(1, max_known)
        self._queues: OrderedDict[str, AzureQueue] = OrderedDict()
        # Queues this process created or found: ensure_queues sends nothing for them.
        self._known: OrderedDict[str, None] = OrderedDict()

    def queue(self, name: str) -> AzureQueue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = AzureQueue(self.service.get_queue_client(name))
            while len(self._queues) > self._max_queues:
                self._queues.popitem(last=False)
        else:
            self._queues.move_to_end(name)
        return queue

    def cached(self) -> tuple[int, int]:
        """How many queue clients and known queue names this broker keeps."""
        return len(self._queues), len(self._known)

    async def send(
        self,
        queue: str,
        body: str,
        *,
        delay: float = 0.0,
        time_to_live: int | None = None,
        create_missing: bool = True,
    ) -> str:
        client = self.queue(queue).client
        options: dict[str, Any] = {}
        if delay > 0:
            options["visibility_timeout"] = _whole_seconds(delay)
        if time_to_live is not None:
            options["time_to_live"] = time_to_live
        try:
            sent = await client.send_message(body, **options)
        except ResourceNotFoundError as error:
            if not create_missing:
                raise QueueNotFound(f"the queue {queue!r} does not exist") from error
            await self.ensure_queues([queue])
            sent = await client.send_message(body, **options)
        return str(sent.id)

    def visible_after(self, delay: float) -> float:
        return float(_whole_seconds(delay))

    async def ensure_queues(self, names: Iterable[str]) -> None:
        missing = [name for name in names if name not in self._known]

        async def create(name: str) -> None:
            with contextlib.suppress(ResourceExistsError):
                await self.queue(name).client.create_queue()
            self._known[name] = None
            while len(self._known) > self._max_known:
                self._known.popitem(last=False)

        await asyncio.gather(*(create(name) for name in missing))

    def unavailable(self, error: BaseException) -> bool:
        """A refused or dropped connection, a 5xx, or 429."""
        if isinstance(error, (ServiceRequestError, ServiceResponseError)):
            return True
        if isinstance(error, HttpResponseError):
            status = error.status_code or 0
            return status >= 500 or status == 429
        return False

    async def probe(self) -> None:
        """One cheap request to the queue service; raises if it does not answer."""
        async for _ in self.service.list_queues(results_per_page=1):
            break

    async def close(self) -> None:
        for queue in self._queues.values():
            await queue.client.close()
        await self.service.close()
