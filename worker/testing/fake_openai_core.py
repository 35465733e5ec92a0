"""State shared by every API of the fake OpenAI server, and the fault gate of model calls."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

from aiohttp import web

from worker.testing.fake_openai_brain import Brain, Scenario
from worker.testing.fake_openai_common import ApiError, RecordedRequest
from worker.testing.fake_openai_faults import FaultBook, FaultRule
from worker.testing.fake_openai_webhooks import WebhookSender

__all__ = ["CURRENT_BODY", "CURRENT_RECORD", "FakeCore", "body_of", "fault_error"]

# What the middleware parsed and recorded for the request being handled. aiohttp handles each
# request inside the task of its connection, so a context variable set by the middleware is the
# handler's own (and works on every aiohttp 3.x, unlike typed request keys).
CURRENT_BODY: contextvars.ContextVar[Any] = contextvars.ContextVar("fake_openai_body")
CURRENT_RECORD: contextvars.ContextVar[RecordedRequest | None] = contextvars.ContextVar(
    "fake_openai_record", default=None
)


def body_of(request: web.Request) -> dict[str, Any]:
    """The parsed JSON object of a POST; 400 when the body is missing or not an object."""
    body = CURRENT_BODY.get(None)
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request: expected a JSON object.",
        )
    return body


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def fault_error(rule: FaultRule, model: str | None) -> ApiError:
    """The error a `429` or `500` rule answers with (as a status, or as a stream's error event)."""
    if rule.kind == "429":
        retry_after = rule.retry_after if rule.retry_after is not None else 1.0
        return ApiError(
            429,
            f"Rate limit reached for {model or 'this model'} (fake). "
            f"Please try again in {_seconds(retry_after)}s.",
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={
                "Retry-After": _seconds(retry_after),
                # The SDK prefers the millisecond header when both are present.
                "retry-after-ms": str(int(retry_after * 1000)),
            },
        )
    return ApiError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
        code="server_error",
    )


class FakeCore:
    """The brain, the fault book, the request records, the timing settings and the webhooks.

    Handlers run on the server's event loop while tests script and inspect from other threads:
    every mutation of shared state happens under `lock`, never across an `await`.
    """

    def __init__(
        self,
        *,
        background_delay: float,
        run_expiry: float,
        scenario: str | Scenario,
        chunk_delay: float = 0.0,
    ) -> None:
        self.lock = threading.RLock()
        self.brain = Brain(scenario)
        self.faults = FaultBook()
        self.records: list[RecordedRequest] = []
        self.background_delay = background_delay
        self.run_expiry = run_expiry
        # Seconds before each streamed chunk of text or arguments (0.05: 20 chunks a second).
        self.chunk_delay = chunk_delay
        # Signed webhooks when a background response ends (off until configured).
        self.webhooks = WebhookSender()
        # False: `include` is refused with a 400, as by a service that does not know it.
        self.include_supported = True

    def record(self, record: RecordedRequest) -> None:
        """Keep a request record."""
        with self.lock:
            self.records.append(record)

    async def gate(
        self,
        request: web.Request,
        api: str,
        endpoint: str,
        model: str | None,
        *,
        streamed: bool = False,
    ) -> FaultRule | None:
        """Mark the request as a model call and apply the fault due for it, if any.

        Called before the handler changes any state, so a faulted call has no effect (as a
        rejected request on the real API). Returns normally for no fault and for `slow`; a
        mid-stream fault (only for a ``streamed`` call) is returned for the stream to apply.
        """
        record = CURRENT_RECORD.get()
        if record is not None:
            record.api, record.endpoint, record.model = api, endpoint, model
        rule = self.faults.pick(api, endpoint, model, streamed)
        if rule is None:
            return None
        if record is not None:
            record.fault = rule.kind
        if rule.mid_stream:
            return rule
        if rule.kind == "slow":
            await asyncio.sleep(rule.delay or 0.0)
            return None
        if rule.kind in ("429", "500"):
            raise fault_error(rule, model)
        # "drop": close the socket without a status line; the client sees a protocol error.
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError
