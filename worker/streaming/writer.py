"""The per-call writer of a streamed run: turns what the model writes into ``assistantDelta``
events (SPEC §4.5, §5.4).

A ``DeltaWriter`` is what a backend sees as ``TurnRequest.stream``. It collects text and flushes
it as one delta every ``WORKER_STREAM_INTERVAL_MS`` while there is new text (the first one an
interval after the first text), never cut inside a character; at the end of the call
``finish`` sends the last delta, which names the tool calls the call ended with. Deltas are
numbered ``seq`` 0, 1, 2, ... within the call's (``step``, ``attempt``).

A ``responses`` call can be resumed exactly after a crash: before a delta is sent, its
checkpoint (its seq, the text it carries and the position in the response's event stream where
that text ends) is stored by the ``checkpoint`` callback (the step handler keeps it in the
call's claim row). A try that takes the call over re-sends that delta as it was (a consumer
drops the repeat) and goes on after its position: same attempt, ``seq`` goes on.

A delta that cannot be sent is logged and counted; the run goes on (deltas are a preview, the
reply's ``content`` is the truth). A checkpoint that cannot be stored fails the call: a delta
whose checkpoint is not stored must not be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from schemas.events import AssistantDelta, DeltaToolCall
from worker.streaming.coalesce import Coalescer, pieces
from worker.streaming.sinks import DeltaObserver, Sink

log = structlog.get_logger("worker.streaming")


@dataclass(frozen=True)
class DeltaSource:
    """Whose deltas a writer sends: the run's request, and which model call and try."""

    chat_id: str
    run_id: str
    request_id: str
    step: int
    attempt: int
    api: str = "chat"


@dataclass(frozen=True)
class Checkpoint:
    """A delta (or the pieces of one flush) as stored before it is sent: its first ``seq``,
    the characters of the call's text sent before it (``chars``), its ``text``, and the
    position in the remote event stream where that text ends (``until``). ``text`` is None for
    the checkpoint of a stream that has just started (nothing sent yet)."""

    attempt: int
    seq: int
    chars: int
    until: int
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The checkpoint without its text (stored apart: it may be long)."""
        return {"attempt": self.attempt, "seq": self.seq, "chars": self.chars, "until": self.until}

    @classmethod
    def from_json(cls, value: dict[str, Any], text: str | None) -> Checkpoint:
        return cls(
            int(value["attempt"]),
            int(value["seq"]),
            int(value["chars"]),
            int(value["until"]),
            text,
        )


@dataclass(frozen=True)
class Progress:
    """How far a call's stream got: the next delta is ``seq`` and carries the call's text from
    character ``chars`` on. Kept in the run's handle when a ``responses`` call goes on by
    polling, so that its last delta goes on from there, under the same attempt."""

    step: int
    attempt: int
    seq: int
    chars: int

    def to_json(self) -> dict[str, int]:
        return {"step": self.step, "attempt": self.attempt, "seq": self.seq, "chars": self.chars}

    @classmethod
    def from_json(cls, value: object) -> Progress | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(
                int(value["step"]), int(value["attempt"]), int(value["seq"]), int(value["chars"])
            )
        except (KeyError, TypeError, ValueError):
            return None


SaveCheckpoint = Callable[[Checkpoint], Awaitable[None]]
SaveStart = Callable[[dict[str, Any], Checkpoint], Awaitable[None]]


class DeltaWriter:
    """Coalesces one model call's text into deltas and sends them to ``sink``."""

    def __init__(
        self,
        sink: Sink,
        source: DeltaSource,
        interval: float,
        *,
        seq: int = 0,
        chars: int = 0,
        resume: Checkpoint | None = None,
        checkpoint: SaveCheckpoint | None = None,
        on_started: SaveStart | None = None,
        observer: DeltaObserver | None = None,
        redact: Callable[[str], str] = lambda text: text,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self.source = source
        self._interval = interval
        self._seq = seq
        self._chars = chars
        self._resume = resume
        self._position: int | None = None
        if resume is not None:
            # The resumed try goes on after the stored delta (``begin`` sends it again).
            again = resume.text or ""
            self._seq = resume.seq + (len(pieces(again)) if resume.text is not None else 0)
            self._chars = resume.chars + len(again)
            self._position = resume.until
        self._checkpoint = checkpoint
        self._on_started = on_started
        self._observer = observer
        self._redact = redact
        self._clock = clock
        self._coalescer = Coalescer()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._due = 0.0
        self._settled = False
        self._failure: BaseException | None = None
        self._opened = clock()
        self.first_text_at: float | None = None
        self._first_sent = False
        self.sent = 0
        self.failed = 0

    # --- what the backend sees (worker.backends.base.TextStream) -------------------------------

    @property
    def resume_after(self) -> int | None:
        return self._resume.until if self._resume is not None else None

    async def started(self, handle: dict[str, Any], position: int) -> None:
        """The remote response exists: its handle and first position are stored, so that a
        try that takes the call over follows it instead of starting again."""
        self._position = position
        if self._on_started is not None:
            await self._on_started(
                handle, Checkpoint(self.source.attempt, self._seq, self._chars, position)
            )

    async def text(self, text: str, position: int | None = None) -> None:
        if self._failure is not None:
            raise self._failure
        if self._settled:
            return
        now = self._clock()
        if self.first_text_at is None:
            self.first_text_at = now
            self._due = now + self._interval
        self._coalescer.add(text)
        if position is not None:
            self._position = position
        if self._coalescer.ready():
            self._wake.set()
            if self._timer is None:
                self._timer = asyncio.create_task(self._tick())

    # --- what the step handler uses --------------------------------------------------------------

    async def begin(self) -> None:
        """Before the model is called: a try that resumes an earlier one re-sends that try's
        last delta first, as it was stored (the consumer drops it if it had it)."""
        resume = self._resume
        if resume is None or resume.text is None:
            return
        async with self._lock:
            for number, part in enumerate(pieces(resume.text)):
                await self._send(part, None, resume.seq + number)

    @property
    def count(self) -> int:
        """Deltas of this call so far (sent or lost): the next ``seq``."""
        return self._seq

    def progress(self) -> Progress:
        """Where the next delta starts (call ``settle`` first)."""
        return Progress(self.source.step, self.source.attempt, self._seq, self._chars)

    async def settle(self) -> None:
        """Stop flushing on the clock; waits for a flush under way. Text still collected is
        left for ``finish``."""
        self._settled = True
        async with self._lock:
            pass
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if self._failure is not None:
            raise self._failure

    async def finish(self, content: str | None, tool_calls: Sequence[tuple[str, str]]) -> None:
        """The call's last delta: its text not sent yet and the calls it ended with
        (``(id, name)`` pairs). ``content``: the call's whole text (what is stored), from
        which the rest is taken, so the deltas always add up to it."""
        await self.settle()
        rest = self._coalescer.take()
        if content is not None:
            rest = content[self._chars :] if len(content) >= self._chars else ""
        calls = [DeltaToolCall(id=call_id, name=name) for call_id, name in tool_calls]
        async with self._lock:
            await self._send_text(rest, calls or None)

    # --- inside -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Flush the collected text when it is due, while the call streams."""
        while True:
            await self._wake.wait()
            wait = self._due - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self._lock:
                if self._settled:
                    return
                self._wake.clear()
                if not self._coalescer.ready():
                    continue  # ends inside a character: the next text wakes us
                try:
                    await self._flush()
                except Exception as error:
                    self._failure = error
                    return
                self._due = self._clock() + self._interval

    async def _flush(self) -> None:
        """Checkpoint (when the call can be resumed), then send, the text collected."""
        text = self._coalescer.take()
        if self._checkpoint is not None and self._position is not None:
            point = Checkpoint(self.source.attempt, self._seq, self._chars, self._position, text)
            await self._checkpoint(point)
        await self._send_text(text, None)

    async def _send_text(self, text: str, tool_calls: list[DeltaToolCall] | None) -> None:
        """One flush: a delta, or several when the text is too long for one message."""
        parts = pieces(text)
        for number, part in enumerate(parts):
            last = number == len(parts) - 1
            await self._send(part, tool_calls if last else None, self._seq)
            self._seq += 1
        self._chars += len(text)

    async def _send(self, text: str, tool_calls: list[DeltaToolCall] | None, seq: int) -> None:
        source = self.source
        event = AssistantDelta(
            id=source.chat_id,
            run_id=source.run_id,
            request_id=source.request_id,
            step=source.step,
            attempt=source.attempt,
            seq=seq,
            text=text,
            tool_calls=tool_calls,
        ).to_wire()
        kind = self._sink.kind
        try:
            await self._sink.send(event)
        except Exception as error:
            # A preview: the run goes on, the reply carries the whole text.
            self.failed += 1
            if self._observer is not None:
                self._observer.observe_delta(kind, "failed")
            log.warning(
                "stream.delta_failed",
                sink=kind,
                run_id=source.run_id,
                step=source.step,
                seq=seq,
                error=self._redact(f"{type(error).__name__}: {error}"),
            )
            return
        self.sent += 1
        if self._observer is not None:
            self._observer.observe_delta(kind, "sent")
            if not self._first_sent:
                waited = self._clock() - self._opened
                self._observer.observe_first_delta(source.api, kind, waited)
        self._first_sent = True
