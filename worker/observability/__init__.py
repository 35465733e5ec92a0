"""Health, metrics and the HTTP server of ``WORKER_HTTP_PORT`` (SPEC §10).

``Health`` and ``Metrics`` are plain objects the app builds and passes down; nothing here is
global. The modules import lazily what they need (prometheus-client, aiohttp's web server).
"""

from worker.observability.health import Health

__all__ = ["Health"]
