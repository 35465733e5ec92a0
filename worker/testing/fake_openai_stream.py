"""Streaming for the fake OpenAI server: how a reply is cut into chunks, and the SSE channel
that sends them with a per-chunk delay and applies mid-stream faults.

A reply's text is streamed word by word (a word with the spaces after it). A character outside
the Basic Multilingual Plane (an emoji) is cut between the two halves of its UTF-16 surrogate
pair, each half sent as a JSON escape (``"\\ud83d"`` then ``"\\ude00"``): real models split
characters that way too, and a client must join them. Tool-call arguments are sent in pieces
of a few characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

from aiohttp import web

from worker.testing.fake_openai_common import ApiError, RecordedRequest
from worker.testing.fake_openai_core import fault_error
from worker.testing.fake_openai_faults import FaultRule

__all__ = ["ARGUMENT_PIECE", "SseChannel", "StreamEnded", "argument_pieces", "text_pieces"]

# Characters per streamed piece of a tool call's arguments.
ARGUMENT_PIECE = 8
_WORDS = re.compile(r"\S+\s*|\s+")


def _split_surrogate(word: str) -> list[str]:
    """``word`` cut inside the surrogate pair of its first non-BMP character, if it has one."""
    for index, char in enumerate(word):
        if ord(char) > 0xFFFF:
            units = char.encode("utf-16-le")
            high = units[:2].decode("utf-16-le", "surrogatepass")
            low = units[2:].decode("utf-16-le", "surrogatepass")
            return [word[:index] + high, low + word[index + 1 :]]
    return [word]


def text_pieces(text: str) -> list[str]:
    """The streamed pieces of ``text``: words, each non-BMP character cut in two halves."""
    pieces: list[str] = []
    for word in _WORDS.findall(text):
        while True:
            first, *rest = _split_surrogate(word)
            pieces.append(first)
            if not rest:
                break
            word = rest[0]
    return pieces


def argument_pieces(arguments: str) -> list[str]:
    """A call's arguments in pieces of ``ARGUMENT_PIECE`` characters (at least one piece)."""
    return [
        arguments[i : i + ARGUMENT_PIECE] for i in range(0, len(arguments), ARGUMENT_PIECE)
    ] or [""]


class StreamEnded(Exception):
    """A mid-stream fault ended the stream (an error event was sent, or the connection
    dropped): the handler sends nothing more."""


class SseChannel:
    """One server-sent-events response: each chunk of text or arguments waits ``chunk_delay``
    seconds first and counts toward a mid-stream fault ``rule``, which fires once ``fires_at``
    chunks were sent."""

    def __init__(
        self,
        request: web.Request,
        record: RecordedRequest | None,
        *,
        chunk_delay: float,
        rule: FaultRule | None,
        chunks: int,
        model: str | None,
    ) -> None:
        self._request = request
        self._record = record
        self._delay = chunk_delay
        self._rule = rule
        self._fires_at = rule.fires_after(chunks) if rule is not None else None
        self._model = model
        self._sent = 0
        self._response: web.StreamResponse | None = None

    async def open(self) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(self._request)
        self._response = response
        return response

    @property
    def response(self) -> web.StreamResponse:
        assert self._response is not None, "open() first"
        return self._response

    async def chunk(self, data: dict[str, Any], *, event: str | None = None) -> None:
        """A chunk of text or arguments: delayed, counted, perhaps faulted first."""
        await self._maybe_fault(data)
        if self._delay > 0:
            await asyncio.sleep(self._delay)
        now = time.time()
        if self._record is not None:
            if self._record.first_token_at is None:
                self._record.first_token_at = now
            self._record.last_token_at = now
        await self.send(data, event=event)
        self._sent += 1

    async def pause_until(self, due: float) -> None:
        """Wait until ``due`` (monotonic seconds), for events scheduled in advance."""
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def send(self, data: dict[str, Any] | str, *, event: str | None = None) -> None:
        """One event, at once (``data`` as JSON, escaping non-ASCII as the API does)."""
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        head = f"event: {event}\n" if event else ""
        try:
            await self.response.write(f"{head}data: {text}\n\n".encode())
        except ConnectionResetError:
            raise StreamEnded() from None  # the client went away

    async def close(self) -> web.StreamResponse:
        with contextlib.suppress(ConnectionResetError):  # the client went away at the end
            await self.response.write_eof()
        return self.response

    async def _maybe_fault(self, data: dict[str, Any]) -> None:
        rule = self._rule
        if rule is None or self._fires_at is None or self._sent != self._fires_at:
            return
        self._rule = None  # once per stream
        if rule.kind == "slow":
            await asyncio.sleep(rule.delay or 0.0)
            return
        if rule.kind == "drop":
            if self._request.transport is not None:
                self._request.transport.abort()
            raise asyncio.CancelledError
        error: ApiError = fault_error(rule, self._model)
        if "sequence_number" in data:
            # The Responses API's error event.
            await self.send(
                {
                    "type": "error",
                    "code": error.code,
                    "message": error.message,
                    "param": None,
                    "sequence_number": data["sequence_number"],
                },
                event="error",
            )
        else:
            await self.send(error.body())
        await self.close()
        raise StreamEnded()
