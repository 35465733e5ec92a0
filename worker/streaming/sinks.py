"""Where a streamed run's events go, behind one small interface (SPEC §5.4).

A ``Sink`` sends one event. ``StreamSinks`` (one per process, built by the wiring) picks the
sink of a request: the Redis stream of the request when ``WORKER_STREAM_REDIS_URL`` is set,
else the post's ``replyTo`` queue; a post with neither has nowhere to stream to. The
``assistantReply`` of a streamed run goes to ``replyTo`` as a follow-up like any reply, and also
as the last entry of the Redis stream (``publish_reply``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import structlog

from schemas import encode_body
from schemas.decode import Encoding
from worker.queues.transport import Broker
from worker.streaming.redis_streams import KEPT_AFTER_RUN, RedisStreams, stream_key

log = structlog.get_logger("worker.streaming")


class Sink(Protocol):
    """Sends the events of one request's stream."""

    @property
    def kind(self) -> str:
        """``queue`` or ``redis`` (the metrics' label)."""

    async def send(self, event: dict[str, Any]) -> None:
        """Send one event; raises when it could not be sent."""


class QueueSink:
    """Events as messages on the post's ``replyTo`` queue (consumers order them by ``seq``)."""

    kind = "queue"

    def __init__(self, broker: Broker, queue: str, encoding: Encoding) -> None:
        self._broker = broker
        self._queue = queue
        self._encoding = encoding

    async def send(self, event: dict[str, Any]) -> None:
        await self._broker.send(self._queue, encode_body(event, self._encoding))


class RedisSink:
    """Events as entries of the request's Redis stream."""

    kind = "redis"

    def __init__(self, streams: RedisStreams, key: str, keep_seconds: float) -> None:
        self._streams = streams
        self._key = key
        self._keep = keep_seconds

    async def send(self, event: dict[str, Any]) -> None:
        await self._streams.append(self._key, event, self._keep)


class DeltaObserver(Protocol):
    """What the metrics record of streamed output (``worker.observability.metrics``)."""

    def observe_delta(self, sink: str, outcome: str) -> None: ...

    def observe_first_delta(self, api: str, sink: str, seconds: float) -> None: ...


class StreamSinks:
    """The sinks of this process: the broker's queues, and Redis when configured."""

    def __init__(
        self,
        broker: Broker,
        encoding: Encoding,
        *,
        redis: RedisStreams | None = None,
        run_timeout: float = 600.0,
        observer: DeltaObserver | None = None,
        redact: Callable[[str], str] = lambda text: text,
    ) -> None:
        self._broker = broker
        self._encoding = encoding
        self._redis = redis
        # A stream whose run never replies still expires an hour after the run's deadline.
        self._keep_while_running = run_timeout + 60 + KEPT_AFTER_RUN
        self.observer = observer
        self.redact = redact

    @property
    def redis(self) -> bool:
        """Whether streamed events go to Redis."""
        return self._redis is not None

    def can_stream(self, reply_to: str | None) -> bool:
        """Whether a post with this ``replyTo`` has somewhere to stream to."""
        return self._redis is not None or bool(reply_to)

    def for_request(self, chat_id: str, request_id: str, reply_to: str | None) -> Sink | None:
        """The sink of a request's events; None when there is none."""
        if self._redis is not None:
            key = stream_key(chat_id, request_id)
            return RedisSink(self._redis, key, self._keep_while_running)
        if reply_to:
            return QueueSink(self._broker, reply_to, self._encoding)
        return None

    async def publish_reply(self, chat_id: str, request_id: str, reply: dict[str, Any]) -> None:
        """The reply of a streamed run as the last entry of its Redis stream, which then
        expires an hour later. Best effort: a failure is logged (the reply also goes to
        ``replyTo`` when the post named one, and the chat holds it)."""
        if self._redis is None:
            return
        try:
            await self._redis.append(stream_key(chat_id, request_id), reply, KEPT_AFTER_RUN)
        except Exception as error:
            log.warning(
                "stream.reply_failed",
                sink="redis",
                where=self._redis.where,
                error=self.redact(f"{type(error).__name__}: {error}"),
            )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
