"""Redis Streams, the second sink of streamed output (SPEC §5.4), and their reader.

Each request has its own stream, ``assistant-stream:{id}:{requestId}``: one entry per event,
with one field ``event`` holding the event's JSON, the ``assistantReply`` last. A client reads
it from any entry id with ``XREAD`` (``0-0``: from the start), so after a disconnect it goes on
from the last id it saw. The length is capped (``XADD MAXLEN ~``) and the key expires an hour
after the run ends (and at the latest an hour after the run's deadline, should no reply come).

The ``redis`` package's asyncio client is loaded only when a Redis URL is configured, and
then at start (``RedisStreams``): loading it at a run's first delta would hold that delta up.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from worker.config.settings import masked_url

if TYPE_CHECKING:
    import redis.asyncio

KEY_PREFIX = "assistant-stream"
# Entries a stream keeps (about: MAXLEN ~ trims whole macro nodes); 250 ms deltas of a 10-minute
# run with many tool rounds stay well below it. The reply's content is whole whatever the cap.
MAX_ENTRIES = 10_000
# Seconds a stream is kept after its run ended.
KEPT_AFTER_RUN = 3600
# Seconds a Redis command may take before it counts as failed.
COMMAND_TIMEOUT = 5.0
# Connections to the Redis server per process. Hundreds of runs stream at once: a command
# waits for a free connection rather than fail when all are busy (the client's default pool
# refuses the 101st: "Too many connections"), up to CONNECTION_WAIT seconds: a process whose
# event loop is saturated by hundreds of streams holds each connection longer than a round
# trip, and a delta that waits is better than a delta lost.
MAX_CONNECTIONS = 64
CONNECTION_WAIT = 30.0
FIELD = "event"


def stream_key(chat_id: str, request_id: str) -> str:
    """The Redis key of a request's stream."""
    return f"{KEY_PREFIX}:{chat_id}:{request_id}"


def _client(url: str) -> redis.asyncio.Redis:
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=CONNECTION_WAIT,
        socket_timeout=COMMAND_TIMEOUT,
        socket_connect_timeout=COMMAND_TIMEOUT,
        decode_responses=True,
    )
    return redis.asyncio.Redis(connection_pool=pool)


class RedisStreams:
    """The worker's writing side: appends events to request streams."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._redis: redis.asyncio.Redis | None = None
        import redis.asyncio  # noqa: F401  (at start; see the module's docstring)

    @property
    def where(self) -> str:
        """The server, for logs (its password masked)."""
        return masked_url(self._url)

    def _connection(self) -> redis.asyncio.Redis:
        if self._redis is None:
            self._redis = _client(self._url)
        return self._redis

    async def append(self, key: str, event: dict[str, Any], keep_seconds: float) -> str:
        """Add ``event`` to the stream ``key`` (capped), which expires ``keep_seconds`` from
        now unless a later event extends it; one round trip. Returns the entry id."""
        pipe = self._connection().pipeline(transaction=False)
        pipe.xadd(key, {FIELD: json.dumps(event, ensure_ascii=False)}, maxlen=MAX_ENTRIES)
        pipe.expire(key, max(int(keep_seconds), 1))
        entry_id, _ = await pipe.execute()
        return str(entry_id)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            await self._redis.connection_pool.disconnect()
            self._redis = None


class RedisReader:
    """A client's reading side: the events of a request's stream, from any entry id."""

    def __init__(self, url: str) -> None:
        self._redis = _client(url)

    async def read(
        self, key: str, after: str = "0-0", *, block: float = 1.0, count: int = 500
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after entry ``after`` (waiting up to ``block`` seconds for the first), with
        their entry ids, oldest first."""
        # [[key, [(entry id, {field: value}), ...]]] (the client's types are looser).
        response: Any = await self._redis.xread(
            {key: after}, count=count, block=max(int(block * 1000), 1)
        )
        events: list[tuple[str, dict[str, Any]]] = []
        for _name, entries in response or []:
            for entry_id, fields in entries:
                try:
                    event = json.loads(fields.get(FIELD, ""))
                except (TypeError, ValueError):
                    continue
                if isinstance(event, dict):
                    events.append((str(entry_id), event))
        return events

    async def ttl(self, key: str) -> int:
        """Seconds until ``key`` expires (-1: never, -2: no such key)."""
        return int(await self._redis.ttl(key))

    async def close(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()
