"""``POST /webhooks/openai``: the webhooks of OpenAI and Azure OpenAI (SPEC §5.1), served when
``WORKER_WEBHOOK_SECRETS`` is set.

Each delivery is checked before anything else: the body is capped (``MAX_BODY``, 413 beyond),
then its Standard Webhooks signature (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``) is verified by the ``standardwebhooks`` library against each configured
secret (several while one is rotated out), which also refuses a timestamp more than five
minutes away; a delivery that fails is answered 400 and changes nothing. A ``webhook-id`` seen
in the last ``SEEN_FOR`` seconds is a duplicate (a retry whose answer the provider missed, or a
replay) and does nothing more; so is a second event for a response whose end was already dealt
with here (at most one wake-up per response and replica).

An event that ends a background response continues its run through the runs queue
(``handlers.webhooks``): the step that polls the response is sent due now, and this worker's
poll of the runs queue is woken for it. That work (reading the run, sending its step) goes on
after the answer: once verified, a delivery is answered at once, 202, so that the provider
never waits on storage and a burst of deliveries costs the answers nothing but their check.
At most ``MAX_PENDING`` deliveries wait for their work (``MAX_WORKING`` of them work at once);
beyond that a delivery is answered 503 and the provider delivers it again later. Every other
event type is acknowledged (200) and ignored. The route is a hint that saves waiting for the
next poll: polls go on (``WORKER_WEBHOOK_POLL_BACKOFF``), so a delivery lost, refused, or
whose work fails (storage out, a crash after the answer) only delays its run.
"""

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import structlog
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from handlers.webhooks import RESPONSE_ENDED, WebhookResult
from schemas import encode_body
from worker.config.redact import Redactor
from worker.loop.errors import describe
from worker.loop.handling import Send
from worker.queues.transport import Broker

PATH = "/webhooks/openai"
# Bytes a delivery may have: the events are a few hundred bytes.
MAX_BODY = 64 * 1024
# Deliveries whose work (reading the run, sending its step) waits or runs, and how many run at
# once: beyond the first, a delivery is refused 503 (the provider delivers it again later).
MAX_PENDING = 5_000
MAX_WORKING = 32
# How long a webhook-id is remembered: the signature's tolerance (5 minutes) and a margin.
SEEN_FOR = 600.0
SEEN_MAX = 100_000
# Seconds after which an early event (its run had not stored the response yet) looks again.
EARLY_RECHECKS = (0.25, 0.5, 1.0, 2.0)

_log = structlog.get_logger("worker.webhooks")

Handle = Callable[[str], Awaitable[WebhookResult]]
Observe = Callable[[str], None]


class SeenIds:
    """Ids seen recently (webhook-ids, response ids), forgotten after ``SEEN_FOR`` s
    (bounded)."""

    def __init__(self, keep_for: float = SEEN_FOR, limit: int = SEEN_MAX) -> None:
        self._keep_for = keep_for
        self._limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, webhook_id: str, now: float) -> bool:
        """Remember ``webhook_id``; False when it was seen already (a duplicate)."""
        while self._seen and (
            len(self._seen) >= self._limit or next(iter(self._seen.values())) < now - self._keep_for
        ):
            self._seen.popitem(last=False)
        if webhook_id in self._seen:
            return False
        self._seen[webhook_id] = now
        return True

    def seen(self, key: str, now: float) -> bool:
        """Whether ``key`` was added within ``SEEN_FOR`` s (without adding it)."""
        at = self._seen.get(key)
        return at is not None and at >= now - self._keep_for

    def forget(self, webhook_id: str) -> None:
        """A delivery that failed here: its retry must be taken."""
        self._seen.pop(webhook_id, None)


class BadDelivery(Exception):
    """A delivery that is refused (400 or 413); the message says why, without secrets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class WebhookRoutes:
    """The webhook route family."""

    def __init__(
        self,
        secrets: Sequence[str],
        handle: Handle,
        broker: Broker,
        *,
        encoding: Literal["none", "base64"],
        wake: Callable[[str, float], None],
        redactor: Redactor,
        observe: Observe | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("the webhook route needs at least one signing secret")
        self._verifiers = [Webhook(secret) for secret in secrets]
        self._handle = handle
        self._broker = broker
        self._encoding = encoding
        self._wake = wake
        self._redact = redactor
        self._observe = observe or (lambda outcome: None)
        self._seen = SeenIds()
        # Responses whose end was dealt with here: their run continued, or has no use for it.
        self._settled_responses = SeenIds()
        self._background: set[asyncio.Task[Any]] = set()
        self._working = asyncio.Semaphore(MAX_WORKING)

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, self._deliver)]

    async def close(self) -> None:
        """Cancel what still runs after its answer (the polls continue those runs)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()

    async def _deliver(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        try:
            body = await self._read(request)
            event = self._verify(body, request)
            response_id = self._response_id(event)
        except BadDelivery as refused:
            self._observe("rejected")
            _log.warning("webhook.rejected", status=refused.status, reason=refused.reason)
            return web.json_response({"error": refused.reason}, status=refused.status)
        webhook_id = request.headers["webhook-id"]
        fields = {"webhook_id": webhook_id[:100], "event_type": str(event.get("type"))[:100]}
        if response_id is None:
            return self._done("ignored", started, fields)
        fields["response_id"] = response_id
        now = time.monotonic()
        if not self._seen.add(webhook_id, now) or self._settled_responses.seen(response_id, now):
            # The same delivery again, or another event for a response already dealt with
            # here (its run was continued, or has nothing to do with it): nothing more to do.
            return self._done("duplicate", started, fields)
        if len(self._background) >= MAX_PENDING:
            self._seen.forget(webhook_id)  # its retry must be taken
            self._settled("busy", started, fields)
            return web.json_response({"error": "busy: deliver again later"}, status=503)
        self._keep(asyncio.create_task(self._dispatch(response_id, started, fields)))
        return web.json_response({"outcome": "accepted"}, status=202)

    def _done(self, outcome: str, started: float, fields: dict[str, str]) -> web.Response:
        self._settled(outcome, started, fields)
        return web.json_response({"outcome": outcome})

    def _settled(self, outcome: str, started: float, fields: dict[str, str]) -> None:
        """One line and one count per delivery, with what it came to."""
        self._observe(outcome)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        _log.info("webhook.received", outcome=outcome, duration_ms=duration_ms, **fields)

    async def _read(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise BadDelivery(413, f"the body is larger than {MAX_BODY} bytes")
        body = bytearray()
        while chunk := await request.content.read(MAX_BODY + 1 - len(body)):
            body.extend(chunk)
            if len(body) > MAX_BODY:
                raise BadDelivery(413, f"the body is larger than {MAX_BODY} bytes")
        return bytes(body)

    def _verify(self, body: bytes, request: web.Request) -> dict[str, Any]:
        """The event, once one of the secrets verifies the signature and the timestamp is
        within five minutes (the library's check, never a hand-made one)."""
        headers = {
            name: request.headers.get(name, "")
            for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        }
        for verifier in self._verifiers:
            try:
                verifier.verify(body, headers, json_parse=False)
            except WebhookVerificationError:
                continue
            break
        else:
            # Which part failed (signature, age, headers) is not told to the sender.
            raise BadDelivery(400, "the webhook signature is not valid")
        try:
            event = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadDelivery(400, "the body is not JSON") from None
        if not isinstance(event, dict):
            raise BadDelivery(400, "the body is not a JSON object")
        return event

    @staticmethod
    def _response_id(event: dict[str, Any]) -> str | None:
        """The ended response an event names; None for the events that concern no run."""
        if event.get("type") not in RESPONSE_ENDED:
            return None
        data = event.get("data")
        response_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(response_id, str) or not 1 <= len(response_id) <= 256:
            raise BadDelivery(400, "the event names no response (data.id)")
        return response_id

    async def _dispatch(self, response_id: str, started: float, fields: dict[str, str]) -> None:
        """Continue the run of ``response_id`` if it waits for it (after the answer)."""
        try:
            async with self._working:
                result = await self._handle(response_id)
                if result.send is not None:
                    await self._send(result.send)
        except Exception as error:
            # Left to the safety-net poll: storage or the model API did not answer.
            self._observe("failed")
            _log.warning("webhook.failed", error=self._redact(describe(error)), **fields)
            return
        if result.outcome == "early":
            self._keep(asyncio.create_task(self._recheck(response_id)))
        else:
            self._settled_responses.add(response_id, time.monotonic())
        self._settled(result.outcome, started, fields)

    async def _recheck(self, response_id: str) -> None:
        """An early event: its run stores the response within moments; look again then."""
        for delay in EARLY_RECHECKS:
            await asyncio.sleep(delay)
            try:
                result = await self._handle(response_id)
                if result.send is not None:
                    await self._send(result.send)
            except Exception as error:
                _log.warning(
                    "webhook.recheck_failed",
                    response_id=response_id,
                    error=self._redact(describe(error)),
                )
                return
            if result.outcome != "early":
                self._settled_responses.add(response_id, time.monotonic())
                self._observe(f"late_{result.outcome}")
                return

    async def _send(self, send: Send) -> None:
        await self._broker.send(send.queue, encode_body(send.payload, self._encoding))
        self._wake(send.queue, 0.0)  # this worker polls the runs queue for it now

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: counted and logged where it was raised
