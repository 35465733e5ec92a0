"""The worker's HTTP server (``WORKER_HTTP_PORT``): one aiohttp app of route families.

It runs on the worker's own event loop, so ``/healthz`` answering at all says the loop is not
blocked. Nothing here changes state: the query reads the chat table and never creates it.
Each route family is a module of this package (``probes``, ``query``, ``webhooks``) with
``routes()`` and ``close()``; the query is served only with ``WORKER_QUERY_KEYS`` set. The
webhook route is served here, or, with ``WORKER_WEBHOOK_PORT``, by a server of its own on
that port (``webhook_server``): an ingress that exposes that port exposes nothing else.
"""

from collections.abc import Sequence
from typing import Protocol

import structlog
from aiohttp import web

from schemas.names import poison_queue_name
from worker.config.redact import Redactor
from worker.config.settings import Settings
from worker.connections.counting import RequestObserver
from worker.http.keys import QueryKeys
from worker.http.probes import ProbeRoutes
from worker.http.query import QueryRoutes
from worker.observability.depth import DepthPoller
from worker.observability.health import Health
from worker.observability.metrics import Metrics
from worker.queues.transport import Broker
from worker.store.stores import ReadOnlyStores

# Seconds between refreshes of the queue depth gauge.
DEPTH_INTERVAL = 15.0
# Seconds given to open requests when the server stops.
SHUTDOWN_TIMEOUT = 5.0

_log = structlog.get_logger("worker.http")


class RouteFamily(Protocol):
    """Routes served together, and what they hold open."""

    def routes(self) -> list[web.RouteDef]: ...

    async def close(self) -> None: ...


class HttpServer:
    """The aiohttp server; ``start()`` binds (port 0 picks a free one, see ``port``)."""

    def __init__(
        self,
        families: Sequence[RouteFamily],
        *,
        host: str,
        port: int,
        depth: DepthPoller | None = None,
    ) -> None:
        self.families = list(families)
        self.host = host
        self._requested_port = port
        self._depth = depth
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        app = web.Application()
        for family in self.families:
            app.add_routes(family.routes())
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
        for family in self.families:
            await family.close()


def build_server(
    settings: Settings,
    broker: Broker,
    health: Health,
    metrics: Metrics,
    *,
    requests: RequestObserver | None = None,
    redactor: Redactor | None = None,
    depth_interval: float = DEPTH_INTERVAL,
    extra: Sequence[RouteFamily] = (),
) -> HttpServer:
    """The server of ``WORKER_HTTP_PORT`` for this worker (not started); ``extra``: further
    route families served on it (the webhook route, without ``WORKER_WEBHOOK_PORT``)."""
    if settings.http_port is None:
        raise ValueError("WORKER_HTTP_PORT is not set")
    redact = redactor or Redactor()
    queues = [*settings.work_queues, *(poison_queue_name(q) for q in settings.work_queues)]
    families: list[RouteFamily] = [ProbeRoutes(health, metrics, redact)]
    # Chat content leaves only with a key: without WORKER_QUERY_KEYS the query route does not
    # exist (404 as for any unknown path), and no reader is opened.
    if settings.query_keys:
        stores = ReadOnlyStores(settings, requests)
        families.append(QueryRoutes(stores, redact, QueryKeys(settings.query_keys)))
    return HttpServer(
        [*families, *extra],
        host=settings.http_host,
        port=settings.http_port,
        depth=DepthPoller(broker, queues, metrics, depth_interval),
    )


def webhook_server(settings: Settings, webhooks: RouteFamily) -> HttpServer:
    """The server of ``WORKER_WEBHOOK_PORT``: the webhook route and nothing else."""
    if settings.webhook_port is None:
        raise ValueError("WORKER_WEBHOOK_PORT is not set")
    return HttpServer([webhooks], host=settings.http_host, port=settings.webhook_port)
