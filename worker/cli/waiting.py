"""What ``send post --wait`` sees while it waits for the reply, said once each.

Every few seconds the command looks at what a producer can see: whether the chat exists,
whether its request still sits on the requests queue with no worker having received it, and
whether it was dead-lettered. ``remarks`` (pure) turns a look into the lines not said yet; a
dead letter ends the wait with its reason instead of a silent timeout.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.names import poison_queue_name
from worker.config.settings import Settings
from worker.deadletters.operations import DeadLetterItem
from worker.deadletters.reader import PoisonReader
from worker.queues.transport import MAX_RECEIVE, Broker, QueueNotFound
from worker.store.stores import ChatStores

# Seconds between two looks.
CHECK_EVERY = 2.0
# Seconds a request may sit on the queue unreceived, beyond the longest a worker waits between
# two polls of an idle requests queue (WORKER_MAX_POLLING_INTERVAL), before it is worth a word.
QUIET = 5.0


def quiet_for(max_polling_interval: float) -> float:
    """How long an unreceived request is normal: a running worker polls by then."""
    return max_polling_interval + QUIET


# Seconds between two reads of a poison queue too long to peek through (they lease it).
FULL_READ_EVERY = 30.0


@dataclass(frozen=True)
class Look:
    """What one look found (None: could not tell)."""

    chat_exists: bool | None = None
    # The request is on the queue, visible, and no worker has received it yet.
    unreceived: bool = False
    dead_letter: DeadLetterItem | None = None


@dataclass(frozen=True)
class Request:
    """The request being waited for, as the producer sent it."""

    chat_id: str
    table: str
    storage_setting: str
    message_id: str
    queue: str


def remarks(
    look: Look, elapsed: float, said: set[str], request: Request, quiet: float
) -> list[str]:
    """The lines ``look`` calls for that were not said before (``said`` is updated);
    ``quiet``: see ``quiet_for``."""
    lines: list[tuple[str, str]] = []
    if look.chat_exists is False:
        lines.append(
            (
                "no chat",
                f"assistant {request.chat_id!r} does not exist (yet) in table "
                f"{request.table!r}: the worker retries the post for WORKER_CREATE_GRACE after "
                "it was sent (its own setting, 120 s by default), then dead-letters it. Create "
                f"it with: assistant-worker send create {request.chat_id}",
            )
        )
    elif look.chat_exists and "no chat" in said:
        lines.append(("chat came", f"assistant {request.chat_id!r} exists now"))
    if look.unreceived and elapsed >= quiet:
        lines.append(
            (
                "unreceived",
                f"the request is still on {request.queue!r} after {elapsed:.0f} s and no worker "
                "has received it: is a worker (assistant-worker run) reading that queue on this "
                "storage account?",
            )
        )
    elif not look.unreceived and "unreceived" in said:
        lines.append(("received", "a worker received the request"))
    new = [(key, text) for key, text in lines if key not in said]
    said.update(key for key, _ in new)
    return [text for _, text in new]


def dead_letter_line(item: DeadLetterItem) -> str:
    return (
        f"the request was dead-lettered ({item.error_type}): {item.reason}. "
        f"See: assistant-worker poison show {item.message_id}"
    )


class Watcher:
    """Looks at the chat, the requests queue and its poison queue for one request."""

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        request: Request,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._settings = settings
        self._request = request
        self._clock = clock
        self._stores = ChatStores(settings)
        self._last_full_read: float | None = None

    async def look(self) -> Look:
        chat, unreceived, letter = await asyncio.gather(
            self._chat_exists(), self._unreceived(), self._dead_letter()
        )
        return Look(chat, unreceived, letter)

    async def close(self) -> None:
        await self._stores.close()

    async def _chat_exists(self) -> bool | None:
        request = self._request
        if request.storage_setting not in self._settings.storage:
            return None  # a connection this command does not have: it cannot tell
        try:
            store = await self._stores.get(request.storage_setting, request.table)
            state = await store.load_state(request.chat_id)
        except Exception:
            return None  # best effort: the wait goes on regardless
        return state is not None and state.exists

    async def _unreceived(self) -> bool:
        try:
            visible = await self._broker.queue(self._request.queue).peek(MAX_RECEIVE)
        except Exception:
            return False
        return any(
            d.message_id == self._request.message_id and d.dequeue_count == 0 for d in visible
        )

    async def _dead_letter(self) -> DeadLetterItem | None:
        """Its dead letter, if there is one: peeked (no lease) while the poison queue is
        short enough; a longer one is read under a short lease now and then, as `poison list`
        reads it, and given back at once."""
        name = poison_queue_name(self._request.queue)
        queue = self._broker.queue(name)
        try:
            peeked = await queue.peek(MAX_RECEIVE)
        except QueueNotFound:
            return None
        except Exception:
            return None
        for delivery in peeked:
            item = DeadLetterItem.parse(name, delivery.message_id, delivery.body)
            if item.original_message_id == self._request.message_id:
                return item
        if len(peeked) < MAX_RECEIVE:
            return None
        now = self._clock()
        if self._last_full_read is not None and now - self._last_full_read < FULL_READ_EVERY:
            return None
        self._last_full_read = now
        reader = PoisonReader(self._broker)
        try:
            result = await reader.read(
                [name],
                explicit=False,
                wanted=lambda item: item.original_message_id == self._request.message_id,
                need=1,
            )
            for item in result.items:
                if item.original_message_id == self._request.message_id:
                    return item
        except Exception:
            return None
        finally:
            with contextlib.suppress(Exception):
                await reader.release()
        return None
