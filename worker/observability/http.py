"""The worker's HTTP server (``WORKER_HTTP_PORT``): probes, metrics and the query API.

It runs on the worker's own event loop, so ``/healthz`` answering at all says the loop is not
blocked. Nothing here changes state: the query reads the chat table and never creates it.

- ``GET /healthz``: 200 while the worker loop lives, 503 once it has stopped.
- ``GET /readyz``: 200 when the worker takes work; 503 with the reasons while it is draining
  after SIGTERM, while its storage is down, or before its queues are checked.
- ``GET /metrics``: Prometheus text format.
- ``GET /assistants/{id}?timestampUtc=&collectionName=``: the chat's ``AssistantState``
  (SPEC §4.6); 404 when the chat does not exist, 400 for a bad id, time or table name.
"""

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from aiohttp import web
from azure.data.tables.aio import TableServiceClient

from handlers.query import get_state
from schemas import AssistantState
from schemas.names import MAX_ID_LENGTH, check_key, check_table_name
from worker.azure_clients import table_service
from worker.errors import PermanentError, TransientError
from worker.observability.health import Health
from worker.observability.metrics import Metrics
from worker.observability.storage import RequestObserver
from worker.redact import Redactor
from worker.settings import Settings
from worker.store.tables import TableChatStore
from worker.transport import Broker, poison_queue_name

DEFAULT_TABLE = "ChatState"
# Seconds between refreshes of the queue depth gauge.
DEPTH_INTERVAL = 15.0
# Seconds given to open requests when the server stops.
SHUTDOWN_TIMEOUT = 5.0

_log = structlog.get_logger("worker.http")


class BadRequest(ValueError):
    """A query parameter or path part that cannot be used; the message says which and why."""


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 time (``Z`` or an offset; UTC when none), as the extension's
    ``timestampUtc``."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"timestampUtc {text[:100]!r} is not an ISO-8601 time, e.g. 2026-01-31T12:00:00Z"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def check_chat_id(chat_id: str) -> str:
    if not 1 <= len(chat_id) <= MAX_ID_LENGTH:
        raise BadRequest(f"the assistant id must be 1-{MAX_ID_LENGTH} characters")
    try:
        return check_key(chat_id)
    except ValueError as error:
        raise BadRequest(f"the assistant id {error}") from None


class StateReader:
    """Reads chats from the worker's own storage account without creating anything."""

    def __init__(self, settings: Settings, requests: RequestObserver | None = None) -> None:
        self._settings = settings
        self._requests = requests
        self._service: TableServiceClient | None = None
        self._stores: dict[str, TableChatStore] = {}

    def _store(self, table: str) -> TableChatStore:
        store = self._stores.get(table)
        if store is None:
            if self._service is None:
                self._service = table_service(self._settings.default_storage, self._requests)
            store = TableChatStore(
                self._service.get_table_client(table), self._settings.default_storage_setting
            )
            self._stores[table] = store
        return store

    async def read(self, chat_id: str, table: str, since: datetime | None) -> AssistantState:
        """The ``AssistantState`` (a table that does not exist holds no chat)."""
        return await get_state(self._store(table), chat_id, since)

    async def close(self) -> None:
        for store in self._stores.values():
            await store.client.close()
        self._stores.clear()
        if self._service is not None:
            await self._service.close()
            self._service = None


class DepthPoller:
    """Refreshes ``assistant_worker_queue_depth`` every ``interval`` seconds until stopped."""

    def __init__(
        self, broker: Broker, queues: Sequence[str], metrics: Metrics, interval: float
    ) -> None:
        self._broker = broker
        self._queues = list(queues)
        self._metrics = metrics
        self._interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.refreshed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-depth")

    async def refresh(self) -> None:
        for name in self._queues:
            try:
                count = await self._broker.queue(name).approximate_count()
            except Exception as error:  # a missing or unreachable queue: keep the last value
                _log.debug("queue_depth.failed", queue=name, error=type(error).__name__)
                continue
            self._metrics.set_queue_depth(name, count)
        self.refreshed.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class HttpServer:
    """The aiohttp server; ``start()`` binds (port 0 picks a free one, see ``port``)."""

    def __init__(
        self,
        *,
        health: Health,
        metrics: Metrics,
        reader: StateReader,
        host: str,
        port: int,
        redactor: Redactor | None = None,
        depth: DepthPoller | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.reader = reader
        self.host = host
        self._requested_port = port
        self._redact = redactor or Redactor()
        self._depth = depth
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/assistants/{id}", self._assistant)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(
            self.application(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self._requested_port
        if self._depth is not None:
            self._depth.start()
        _log.info("http.started", host=self.host, port=self.port)

    async def refresh_depth(self) -> None:
        """Refresh the queue depth gauge now (it is refreshed every ``DEPTH_INTERVAL`` s)."""
        if self._depth is not None:
            await self._depth.refresh()

    async def stop(self) -> None:
        if self._depth is not None:
            await self._depth.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            _log.info("http.stopped")
        await self.reader.close()

    # --- handlers -------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health.alive:
            return web.json_response({"alive": True})
        return web.json_response({"alive": False}, status=503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reasons = self.health.ready()
        body = {"ready": ready, "reasons": [self._redact(reason) for reason in reasons]}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        # The exposition format's content type carries its version parameter.
        response.headers["Content-Type"] = self.metrics.content_type
        return response

    async def _assistant(self, request: web.Request) -> web.Response:
        try:
            chat_id = check_chat_id(request.match_info["id"])
            text = request.query.get("timestampUtc")
            since = parse_timestamp(text) if text else None
            table = request.query.get("collectionName") or DEFAULT_TABLE
            try:
                check_table_name(table)
            except ValueError as error:
                raise BadRequest(f"collectionName {error}") from None
        except BadRequest as error:
            return web.json_response({"error": str(error)}, status=400)
        try:
            state = await self.reader.read(chat_id, table, since)
        except TransientError as error:
            return web.json_response({"error": self._redact(error.reason)}, status=503)
        except PermanentError as error:
            return web.json_response({"error": self._redact(error.reason)}, status=502)
        if not state.exists:
            return web.json_response(
                {"error": f"assistant {chat_id!r} does not exist in table {table!r}"}, status=404
            )
        return web.json_response(state.to_wire())


def build_server(
    settings: Settings,
    broker: Broker,
    health: Health,
    metrics: Metrics,
    *,
    requests: RequestObserver | None = None,
    redactor: Redactor | None = None,
    depth_interval: float = DEPTH_INTERVAL,
) -> HttpServer:
    """The server of ``WORKER_HTTP_PORT`` for this worker (not started)."""
    if settings.http_port is None:
        raise ValueError("WORKER_HTTP_PORT is not set")
    queues = [*settings.work_queues, *(poison_queue_name(q) for q in settings.work_queues)]
    return HttpServer(
        health=health,
        metrics=metrics,
        reader=StateReader(settings, requests),
        host=settings.http_host,
        port=settings.http_port,
        redactor=redactor,
        depth=DepthPoller(broker, queues, metrics, depth_interval),
    )
