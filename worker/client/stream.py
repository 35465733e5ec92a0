"""Reading a streamed run (SPEC §4.5, §5.4): the consumer rule, once, and the two places the
events come from (a reply queue, a Redis stream).

The rule: for each ``step`` keep the deltas of its highest ``attempt`` (a try that started
over sends its text again under the next one), order them by (``step``, ``seq``), and ignore a
repeat (same step, attempt and seq: a resumed stream may send its last delta twice). The
``assistantReply`` carries ``deltaCount``, the number of deltas of the kept attempts, so a
consumer knows when it holds them all (queues do not keep order: deltas may come after the
reply). The reply's ``content`` is the truth; the deltas are its preview.

The CLI (``send post --wait --stream``, ``watch``) and the demo use it; the consumers of
docs/producers.md are the same rule in Python and JavaScript.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas import InvalidMessage, decode_body
from worker.queues.transport import Broker
from worker.streaming.redis_streams import RedisReader, stream_key

# Seconds between receives of a reply queue while a run streams.
QUEUE_POLL = 0.05
# Seconds a consumer that has the reply waits for deltas still on their way.
STRAGGLERS = 2.0


@dataclass
class _Attempt:
    attempt: int
    texts: dict[int, str] = field(default_factory=dict)
    # The seq of the delta that ended this try with tool calls (the run goes on to the next
    # step), once it is here.
    ended: int | None = None


class DeltaAssembler:
    """The consumer rule: the text of a request's deltas, as they come, in any order."""

    def __init__(self) -> None:
        self._steps: dict[int, _Attempt] = {}
        self.reply: dict[str, Any] | None = None

    def add(self, event: dict[str, Any]) -> bool:
        """Take one event of the request in; True when it changed what is held."""
        kind = event.get("type")
        if kind == "assistantReply":
            self.reply = event
            return True
        if kind != "assistantDelta":
            return False
        step, attempt, seq = int(event["step"]), int(event["attempt"]), int(event["seq"])
        kept = self._steps.get(step)
        if kept is None or attempt > kept.attempt:
            kept = self._steps[step] = _Attempt(attempt)  # a new try replaces the old one's
        elif attempt < kept.attempt or seq in kept.texts:
            return False  # an older try, or a repeat
        kept.texts[seq] = str(event.get("text") or "")
        if event.get("toolCalls"):
            kept.ended = seq
        return True

    @property
    def held(self) -> int:
        """Deltas of the kept attempts."""
        return sum(len(kept.texts) for kept in self._steps.values())

    @property
    def complete(self) -> bool:
        """The reply came, and every delta it counts is here."""
        if self.reply is None:
            return False
        expected = self.reply.get("deltaCount")
        return expected is None or self.held >= int(expected)

    def text(self) -> str:
        """Everything held, in order (gaps skipped)."""
        return "".join(
            kept.texts[seq] for _, kept in sorted(self._steps.items()) for seq in sorted(kept.texts)
        )

    def preview(self) -> str:
        """The text that can be shown so far, in order: up to the first delta still on its
        way (a step's text shows once the step before it is whole: ended with its calls)."""
        shown: list[str] = []
        for step in range(len(self._steps)):
            kept = self._steps.get(step)
            if kept is None:
                break
            seq = 0
            while seq in kept.texts:
                shown.append(kept.texts[seq])
                seq += 1
            if kept.ended is None or seq <= kept.ended:
                break  # this step goes on (or a delta of it is on its way)
        return "".join(shown)


class EventSource(Protocol):
    """Where a request's events come from."""

    def events(self) -> AsyncIterator[dict[str, Any]]: ...


class QueueEvents:
    """A request's events on a reply queue (polled every ``QUEUE_POLL`` s). Events of the
    request are deleted as they are read; others are left for their own consumer."""

    def __init__(self, broker: Broker, queue: str, request_id: str) -> None:
        self._queue = broker.queue(queue)
        self._request_id = request_id

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            for delivery in await self._queue.receive(32, 30):
                try:
                    event = decode_body(delivery.body)
                except InvalidMessage:
                    await self._queue.complete(delivery)
                    continue
                if event.get("requestId") not in (self._request_id, None):
                    await self._queue.release(delivery, 0)
                    continue
                await self._queue.complete(delivery)
                yield event
            await asyncio.sleep(QUEUE_POLL)


class RedisEvents:
    """A request's Redis stream, from its first entry (or ``after`` an entry id)."""

    def __init__(self, url: str, chat_id: str, request_id: str, after: str = "0-0") -> None:
        self._reader = RedisReader(url)
        self._key = stream_key(chat_id, request_id)
        self.last_id = after

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                for entry_id, event in await self._reader.read(self._key, self.last_id):
                    self.last_id = entry_id  # a reader that reconnects goes on from here
                    yield event
        finally:
            await self._reader.close()


async def follow(
    source: EventSource,
    *,
    within: float,
    on_text: Callable[[str], None] = lambda text: None,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
) -> DeltaAssembler:
    """Read ``source`` until the reply and every delta it counts are in (or ``within``
    seconds pass; a few seconds more for deltas still on their way once the reply is in).
    ``on_text`` gets the text as it can be shown, in order; when a model call starts over
    it gets what replaces the text shown (see ``Printer``)."""
    assembler = DeltaAssembler()
    printer = Printer(on_text)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within

    async def read() -> None:
        nonlocal deadline
        async for event in source.events():
            on_event(event)
            if assembler.add(event):
                printer.show(assembler.preview())
            if assembler.reply is not None:
                if assembler.complete:
                    return
                deadline = min(deadline, loop.time() + STRAGGLERS)

    reading = asyncio.create_task(read())
    try:
        while not reading.done():
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait({reading}, timeout=min(left, 0.5))
        if reading.done():
            reading.result()  # its failure, if it failed
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    return assembler


class Printer:
    """Shows a preview as it grows: only what is new; when a model call started over and the
    preview no longer begins with what was shown, a marker and the new text."""

    RESTART = "\n[the model started over]\n"

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self.shown = ""

    def show(self, preview: str) -> None:
        if preview.startswith(self.shown):
            if len(preview) > len(self.shown):
                self._write(preview[len(self.shown) :])
        else:
            self._write(self.RESTART + preview)
        self.shown = preview
