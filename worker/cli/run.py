"""``assistant-worker run``: the worker process."""

import argparse
import asyncio
import signal

import structlog

from worker.app import open_app
from worker.config.redact import Redactor
from worker.config.settings import SPECS, Settings
from worker.observability.logs import configure_logging
from worker.observability.tracing import setup_tracing


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "run",
        help="start the worker",
        description="Consume the requests, runs and deadlines queues until SIGTERM/SIGINT. On a signal "
        "the worker stops receiving, gives in-flight messages --shutdown-grace seconds, and "
        "leaves the rest to reappear for the next worker. Every flag overrides the "
        "environment variable named in its help.",
    )
    for spec in SPECS:
        parser.add_argument(
            spec.flag,
            dest=spec.field,
            default=None,
            metavar="VALUE",
            help=f"{spec.help} (env {spec.env}, default {spec.default!r})",
        )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="exit when the queues are empty and nothing is in flight",
    )
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_format, Redactor(settings.secrets()))
    # Traces (SPEC §10) when an exporter is configured; open_app picks the provider up.
    tracing = setup_tracing()
    try:
        return asyncio.run(serve(settings, burst=args.burst))
    finally:
        if tracing is not None:
            tracing.shutdown()


async def serve(settings: Settings, *, burst: bool) -> int:
    # With WORKER_HTTP_PORT set, open_app serves /healthz, /readyz, /metrics and the query
    # API on this loop until the worker has drained.
    missing = settings.model_endpoint_missing
    if missing is not None:
        # Said now, not first by the reply of a failed run.
        structlog.get_logger("worker").warning("model.not_configured", reason=missing)
    async with open_app(settings) as app:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, app.worker.stop)
        try:
            if burst:
                await app.worker.run_until_idle()
            else:
                await app.worker.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    structlog.get_logger("worker").info("worker.exited")
    return 0
