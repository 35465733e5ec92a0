"""Wiring: from ``Settings`` to a running worker. Used by the CLI, the demo and the tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from handlers import build_registry
from handlers.services import RunServices
from handlers.tools import ToolRegistry, load_tools, tool_executor
from worker.backends.assistants import AssistantsBackend
from worker.backends.base import Backend
from worker.backends.chat import ChatBackend
from worker.backends.clients import ModelClients
from worker.backends.responses import ResponsesBackend
from worker.config.redact import Redactor
from worker.config.settings import Settings
from worker.connections.clients import CREDENTIAL, queue_service, table_service
from worker.loop.outage import StorageGate
from worker.loop.worker import Worker
from worker.observability import Health
from worker.observability.instrument import instrument_backends
from worker.observability.labels import BoundedLabels
from worker.observability.lag import LagMonitor
from worker.observability.tracing import (
    MessageTracing,
    Tracing,
    current_tracing,
    model_provider,
    tool_call_tracer,
    trace_backends,
)
from worker.queues.azure import AzureQueueBroker
from worker.store.stores import ChatStores
from worker.streaming.redis_streams import RedisStreams
from worker.streaming.sinks import StreamSinks

if TYPE_CHECKING:
    # With WORKER_HTTP_PORT only: prometheus-client and aiohttp's web server load then.
    from worker.http.server import HttpServer, RouteFamily
    from worker.mcp.servers import McpServers
    from worker.observability.metrics import Metrics


@dataclass
class App:
    """The long-lived parts of one worker process."""

    settings: Settings
    broker: AzureQueueBroker
    stores: ChatStores
    worker: Worker
    health: Health = field(default_factory=Health)
    # Metrics and the HTTP server exist when WORKER_HTTP_PORT is set.
    metrics: Metrics | None = None
    http: HttpServer | None = None
    # The webhook route's own server, with WORKER_WEBHOOK_PORT (else it is on ``http``).
    webhook_http: HttpServer | None = None


def build_backends(
    clients: ModelClients,
    metrics: Metrics | None = None,
    *,
    tracing: Tracing | None = None,
    settings: Settings | None = None,
) -> dict[str, Backend]:
    """The three model APIs a run may use (SPEC §5.1), each reporting to ``metrics`` if on,
    and traced if ``tracing`` is on (``settings`` tell the provider: OpenAI or Azure)."""
    backends: list[Backend] = [
        ChatBackend(clients),
        ResponsesBackend(clients),
        AssistantsBackend(clients),
    ]
    # One bound on model names for the metrics and the traces (SPEC §10): the configured
    # default model and the first 10 others this process sees; the rest are "other".
    models = BoundedLabels([settings.chat_model] if settings is not None else [])
    instrumented = instrument_backends(
        {backend.name: backend for backend in backends}, metrics, models
    )
    provider = model_provider(settings) if settings is not None else None
    return trace_backends(instrumented, tracing, provider, models)


def webhook_routes(
    settings: Settings,
    services: RunServices,
    broker: AzureQueueBroker,
    worker: Worker,
    metrics: Metrics | None,
) -> RouteFamily | None:
    """``POST /webhooks/openai`` when ``WORKER_WEBHOOK_SECRETS`` is set (SPEC §5.1): a webhook
    sends the step that polls its response, and wakes this worker's poll of the runs queue."""
    if not settings.webhooks:
        return None
    from handlers.webhooks import WebhookHandler
    from worker.http.webhooks import WebhookRoutes

    return WebhookRoutes(
        settings.webhook_secrets,
        WebhookHandler(services),
        broker,
        encoding=settings.message_encoding,
        wake=worker.expect,
        redactor=worker.redact,
        observe=metrics.observe_webhook if metrics is not None else None,
    )


@asynccontextmanager
async def open_app(
    settings: Settings, tools: ToolRegistry | None = None, *, tracing: Tracing | None = None
) -> AsyncIterator[App]:
    """Build the broker, the stores, the model clients and the worker; close them on exit.

    ``tools`` defaults to the modules named in WORKER_TOOLS (a module that cannot be imported
    raises ``ToolLoadError`` here, before anything is consumed). ``tracing`` defaults to the
    process's tracer provider if an SDK one is installed (``setup_tracing``), else off.
    """
    registry = tools if tools is not None else load_tools(settings.tool_modules)
    health = Health()
    metrics: Metrics | None = None
    if settings.http_port is not None:
        from worker.observability.metrics import Metrics

        metrics = Metrics()
    requests = metrics.observe_storage_request if metrics is not None else None
    if metrics is not None:
        metrics.track_health(health)
        registry.set_observer(metrics.observe_tool_call)
    # Sync tools get a thread per message processed at once (asyncio's default pool is
    # smaller: calls would wait for a thread past their timeout); stuck ones are replaced.
    threads = tool_executor(settings.concurrency)
    registry.set_executor(threads)
    health.track_tool_threads(lambda: threads.stuck)
    if metrics is not None:
        metrics.track_tool_threads(lambda: threads.stuck)
    # Every client with an identity uses the process's one credential, closed at the end.
    CREDENTIAL.retain()
    broker = AzureQueueBroker(queue_service(settings.default_storage, requests))
    stores = ChatStores(settings, lambda connection: table_service(connection, requests))
    clients = ModelClients(settings)
    mcp: McpServers | None = None
    if settings.mcp_servers:
        # The SDK loads only here: a worker without MCP servers never imports it.
        from worker.mcp.servers import McpServers

        mcp = McpServers(settings.mcp_servers)
    tracing = tracing if tracing is not None else current_tracing()
    if tracing is not None:
        # Span names hold only names the operator's code or servers give (SPEC §10).
        servers = mcp

        def known(name: str) -> bool:
            return name in registry or (servers is not None and servers.offers(name))

        registry.set_call_tracer(tool_call_tracer(tracing, known=known))
    streams = StreamSinks(
        broker,
        settings.message_encoding,
        redis=RedisStreams(settings.stream_redis_url) if settings.stream_redis_url else None,
        run_timeout=settings.run_timeout,
        observer=metrics,
        redact=Redactor(settings.secrets()),
    )
    services = RunServices(
        stores=stores,
        settings=settings,
        backends=build_backends(clients, metrics, tracing=tracing, settings=settings),
        tools=registry,
        clock=lambda: datetime.now(UTC),
        redact=Redactor(settings.secrets()),
        mcp=mcp,
        streams=streams,
    )

    async def probe_storage() -> None:
        # Both services of the worker's own account: a partial outage pauses too.
        await asyncio.gather(broker.probe(), stores.probe(settings.default_storage_setting))

    gate = StorageGate(probe_storage)
    gate.subscribe(health.storage_changed)
    worker = Worker(
        broker,
        build_registry(services),
        settings,
        redactor=Redactor(settings.secrets()),
        gate=gate,
        metrics=metrics,
        health=health,
        tracing=MessageTracing(tracing) if tracing is not None else None,
    )
    http: HttpServer | None = None
    # How late the event loop runs (a metric, and a warning above a second), while the app is
    # open: nothing in the worker may hold the loop whatever a message holds.
    lag = LagMonitor(metrics.observe_event_loop_lag if metrics is not None else None)
    lag.start()
    webhook_http: HttpServer | None = None
    try:
        webhooks = webhook_routes(settings, services, broker, worker, metrics)
        if metrics is not None:
            from worker.http.server import build_server

            on_main = [webhooks] if webhooks is not None and settings.webhook_port is None else []
            http = build_server(
                settings, broker, health, metrics, requests=requests, redactor=worker.redact,
                extra=on_main,
            )  # fmt: skip
            await http.start()
        if webhooks is not None and settings.webhook_port is not None:
            from worker.http.server import webhook_server

            webhook_http = webhook_server(settings, webhooks)
            await webhook_http.start()
        yield App(settings, broker, stores, worker, health, metrics, http, webhook_http)
    finally:
        await lag.stop()
        # After the drain: the probes answer (503 not ready) until the worker has stopped.
        if webhook_http is not None:
            await webhook_http.stop()
        if http is not None:
            await http.stop()
        if metrics is not None:
            registry.set_observer(None)
        if tracing is not None:
            registry.set_call_tracer(None)
        await gate.close()
        if mcp is not None:
            await mcp.close()
        await streams.close()
        await clients.close()
        await stores.close()
        await broker.close()
        await CREDENTIAL.release()
        registry.set_executor(None)
        threads.shutdown(wait=False, cancel_futures=True)
