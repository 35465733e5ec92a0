"""Reading the worker's HTTP server as a probe and a Prometheus scraper would."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.env import StorageEnv
from worker.app import App
from worker.config.settings import Settings

# Seconds any one HTTP request of a test may take.
REQUEST_TIMEOUT = 10.0


def http_settings(storage: StorageEnv, **extra: str) -> Settings:
    """This test's settings with the HTTP server on a free port of the loopback."""
    return storage.settings(WORKER_HTTP_PORT="0", WORKER_HTTP_HOST="127.0.0.1", **extra)


@dataclass(frozen=True)
class Reply:
    status: int
    text: str
    content_type: str
    json: Any
    headers: Mapping[str, str] = field(default_factory=dict)


def base_url(app: App) -> str:
    assert app.http is not None and app.http.port, "the HTTP server is not running"
    return f"http://127.0.0.1:{app.http.port}"


async def fetch(
    app: App,
    path: str,
    method: str = "GET",
    *,
    headers: Mapping[str, str] | None = None,
    **params: str,
) -> Reply:
    """One request to the app's server; ``params`` become the query string."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(
            method, base_url(app) + path, params=params, headers=dict(headers or {})
        ) as response,
    ):
        text = await response.text()
        body: Any = None
        if response.content_type == "application/json":
            body = await response.json()
        return Reply(
            response.status,
            text,
            response.headers.get("Content-Type", ""),
            body,
            response.headers.copy(),  # case-insensitive, like HTTP
        )


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a scrape by (name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(app: App) -> Samples:
    reply = await fetch(app, "/metrics")
    assert reply.status == 200, reply.text
    return parse_metrics(reply.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent, as Prometheus reads a series
    that has not started yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
