"""``/healthz`` (liveness), ``/readyz`` (readiness, with the reasons when not ready) and
``/metrics`` (Prometheus text format). They hold no chat content and need no key."""

from aiohttp import web

from worker.config.redact import Redactor
from worker.observability.health import Health
from worker.observability.metrics import Metrics


class ProbeRoutes:
    """The probes and metrics route family."""

    def __init__(self, health: Health, metrics: Metrics, redactor: Redactor) -> None:
        self.health = health
        self.metrics = metrics
        self._redact = redactor

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
        ]

    async def close(self) -> None:
        """Nothing to close."""

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
