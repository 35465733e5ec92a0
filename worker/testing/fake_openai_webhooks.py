"""Webhooks of the fake OpenAI server: a signed event when a background response ends.

As OpenAI and Azure OpenAI do (Standard Webhooks): `POST` to the configured URL with the
headers `webhook-id` (the same for every attempt of one event), `webhook-timestamp` (Unix
seconds of the attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256>` over
`{id}.{timestamp}.{body}` with the `whsec_` secret, signed by the `standardwebhooks` library),
and the body `{"id", "object": "event", "created_at", "type": "response.completed" | ...,
"data": {"id": <response id>}}`. An attempt answered with anything but 2xx (or not answered) is
retried after each of `retry_delays`, then given up.

Faults, drawn from one `random.Random(seed)` in the order responses end (deterministic for a
seed and an order): `drop_rate` (the event is never sent, as a lost webhook), `duplicate_rate`
(delivered, then delivered once more with the same `webhook-id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks.webhooks import Webhook

from worker.testing.fake_openai_common import new_id, wall_now

__all__ = ["Delivery", "WebhookConfig", "WebhookSender"]

# Deliveries in flight at once (a burst of responses ending together is sent through these).
MAX_CONCURRENT = 64


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how the fake sends its webhooks."""

    url: str
    secret: str
    # Further URLs of the same endpoint (the replicas behind a load balancer): each attempt
    # goes to the next one in turn, so a retry reaches another replica.
    also: tuple[str, ...] = ()
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    seed: int | None = None
    # Seconds before each retry of an attempt that failed; after the last, the event is lost.
    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    timeout: float = 5.0

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.also)

    def __post_init__(self) -> None:
        if not all(url.startswith(("http://", "https://")) for url in self.urls):
            raise ValueError("the webhook url must be http(s)")
        Webhook(self.secret)  # raises for a secret that is not base64
        for name, rate in (("drop_rate", self.drop_rate), ("duplicate_rate", self.duplicate_rate)):
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        if any(delay < 0 for delay in self.retry_delays):
            raise ValueError("retry_delays must not be negative")


@dataclass
class Delivery:
    """One event and what became of it (for tests and benchmarks)."""

    webhook_id: str
    event_type: str
    response_id: str
    # When the response ended (monotonic), and when each attempt was answered.
    ended_at: float
    dropped: bool = False
    duplicated: bool = False
    attempts: list[int | None] = field(default_factory=list)  # status, None: no answer
    delivered_at: float | None = None
    answered_in: list[float] = field(default_factory=list)  # seconds per answered attempt

    def to_dict(self) -> dict[str, Any]:
        return {
            "webhook_id": self.webhook_id,
            "type": self.event_type,
            "response_id": self.response_id,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "attempts": list(self.attempts),
            "delivered": self.delivered_at is not None,
        }


class WebhookSender:
    """Schedules and sends the events; runs on the fake server's event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._config: WebhookConfig | None = None
        self._random = random.Random()
        self._signer: Webhook | None = None
        self.deliveries: list[Delivery] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._turn = 0  # the next of the config's URLs

    @property
    def config(self) -> WebhookConfig | None:
        return self._config

    def configure(self, config: WebhookConfig | None) -> None:
        """Send to ``config`` from now on (None: send nothing)."""
        with self._lock:
            self._config = config
            self._random = random.Random(config.seed if config else None)
            self._signer = Webhook(config.secret) if config else None

    def snapshot(self) -> list[Delivery]:
        """The deliveries so far, oldest first."""
        with self._lock:
            return list(self.deliveries)

    def reset(self) -> None:
        """Forget the deliveries (the configuration stays)."""
        with self._lock:
            self.deliveries.clear()

    def response_ended(
        self, response_id: str, after: float, event: Callable[[], str | float | None]
    ) -> None:
        """Announce the end of a response ``after`` seconds from now (call it on the server's
        loop: the event is sent from there). ``event()`` then says which event it is, or
        that the response still works (seconds to check again), or None: nothing to send."""
        if self._config is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            decided = event()
            if isinstance(decided, str):
                self._start(response_id, decided)
            elif isinstance(decided, float | int):
                self._schedule(loop, float(decided), fire)

        self._schedule(loop, after, fire)

    def _schedule(
        self, loop: asyncio.AbstractEventLoop, after: float, fire: Callable[[], None]
    ) -> None:
        timer: asyncio.TimerHandle | None = None

        def run() -> None:
            if timer is not None:
                self._timers.discard(timer)
            fire()

        timer = loop.call_later(max(after, 0.0), run)
        self._timers.add(timer)

    def _start(self, response_id: str, event_type: str) -> None:
        config = self._config
        if config is None:
            return
        with self._lock:
            delivery = Delivery(new_id("wh"), event_type, response_id, time.monotonic())
            delivery.dropped = self._random.random() < config.drop_rate
            delivery.duplicated = self._random.random() < config.duplicate_rate
            self.deliveries.append(delivery)
        if delivery.dropped:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(config, delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, config: WebhookConfig, delivery: Delivery) -> None:
        body = json.dumps(
            {
                "id": new_id("evt"),
                "object": "event",
                "created_at": wall_now(),
                "type": delivery.event_type,
                "data": {"id": delivery.response_id},
            },
            separators=(",", ":"),
        ).encode()
        delays = [0.0, *config.retry_delays]
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            if await self._attempt(config, delivery, body):
                delivery.delivered_at = time.monotonic()
                if delivery.duplicated:
                    # The provider did not hear the answer: the same event once more.
                    await self._attempt(config, delivery, body)
                return

    async def _attempt(self, config: WebhookConfig, delivery: Delivery, body: bytes) -> bool:
        """One signed POST; True when answered 2xx."""
        signer = self._signer
        if signer is None:
            return False
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        async with self._slots:
            now = datetime.now(UTC)
            headers = {
                "content-type": "application/json",
                "webhook-id": delivery.webhook_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signer.sign(delivery.webhook_id, now, body),
                "user-agent": "OpenAI/fake-webhooks",
            }
            started = time.monotonic()
            status: int | None = None
            url = config.urls[self._turn % len(config.urls)]
            self._turn += 1
            try:
                async with self._session.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=config.timeout),
                ) as answer:
                    status = answer.status
                    await answer.read()
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = None
            delivery.attempts.append(status)
            if status is not None:
                delivery.answered_in.append(time.monotonic() - started)
            return status is not None and 200 <= status < 300

    async def close(self) -> None:
        """Cancel what is scheduled or in flight; close the HTTP session."""
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._slots = None
