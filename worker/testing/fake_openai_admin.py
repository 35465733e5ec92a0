"""The admin endpoints of the fake OpenAI server: script, scenario, faults, records, reset.

Over HTTP for processes that cannot call `FakeOpenAI` methods (a worker under test, a benchmark):

- `POST /admin/script` `{"model": "...", "turns": [turn, ...]}` queues scripted turns;
- `POST /admin/default` `{"scenario": "echo" | "weather"}` sets the default scenario;
- `GET /admin/faults`, `POST /admin/faults` `{"kind", "count", "every", "model", "api",
  "endpoint", "retry_after", "delay", "rate", "seed", "after_chunks", "after_fraction"}`,
  `DELETE /admin/faults`;
- `POST /admin/stream` `{"chunk_delay": seconds}` sets the wait before each streamed chunk;
- `GET /admin/requests` (the records), `GET /admin/calls?model=&api=&endpoint=` (`{"calls": n}`);
- `POST /admin/webhooks` `{"url", "secret", "drop_rate", "duplicate_rate", "seed",
  "retry_delays"}` sends signed webhooks when background responses end, `DELETE /admin/webhooks`
  stops them, `GET /admin/webhooks` lists the events sent so far;
- `POST /admin/reset`; `GET /health`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import web

from worker.testing.fake_openai_brain import SCENARIOS, Scenario, Turn
from worker.testing.fake_openai_common import ApiError, RecordedRequest
from worker.testing.fake_openai_core import body_of
from worker.testing.fake_openai_faults import ENDPOINTS, FaultRule
from worker.testing.fake_openai_webhooks import Delivery

__all__ = ["AdminApi"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Controls(Protocol):
    """What the admin endpoints control of the fake (``FakeOpenAI`` has it)."""

    def script(self, model: str, turns: Sequence[Turn]) -> None: ...

    def pending_turns(self, model: str | None = None) -> int: ...

    def set_default(self, scenario: str | Scenario) -> None: ...

    def fault(
        self,
        kind: str,
        *,
        count: int | None = None,
        every: int | None = None,
        model: str | Sequence[str] | None = None,
        api: str | Sequence[str] | None = None,
        endpoint: str | Sequence[str] | None = None,
        retry_after: float | None = None,
        delay: float | None = None,
        rate: float | None = None,
        seed: int | None = None,
        after_chunks: int | None = None,
        after_fraction: float | None = None,
    ) -> FaultRule: ...

    chunk_delay: float

    def clear_faults(self) -> None: ...

    def fault_rules(self) -> list[FaultRule]: ...

    @property
    def requests(self) -> list[RecordedRequest]: ...

    def calls(
        self,
        model: str | None = None,
        api: str | None = None,
        endpoint: str | Sequence[str] | None = None,
    ) -> int: ...

    def reset(self) -> None: ...

    def configure_webhooks(
        self,
        url: str,
        secret: str,
        *,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        seed: int | None = None,
        retry_delays: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        also: Sequence[str] = (),
    ) -> None: ...

    def stop_webhooks(self) -> None: ...

    @property
    def webhook_deliveries(self) -> list[Delivery]: ...


class AdminApi:
    """Admin handlers over a `FakeOpenAI` (not recorded, never faulted)."""

    def __init__(self, fake: Controls) -> None:
        self.fake = fake

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler)."""
        return [
            ("POST", "/admin/script", self.script),
            ("POST", "/admin/default", self.default),
            ("GET", "/admin/faults", self.faults),
            ("POST", "/admin/faults", self.add_fault),
            ("DELETE", "/admin/faults", self.clear_faults),
            ("POST", "/admin/stream", self.stream),
            ("GET", "/admin/requests", self.requests),
            ("GET", "/admin/calls", self.calls),
            ("POST", "/admin/webhooks", self.webhooks),
            ("DELETE", "/admin/webhooks", self.stop_webhooks),
            ("GET", "/admin/webhooks", self.deliveries),
            ("POST", "/admin/reset", self.reset),
            ("GET", "/health", self.health),
        ]

    async def script(self, request: web.Request) -> web.StreamResponse:
        """`POST /admin/script`: queue turns for a model (400 for a malformed turn)."""
        body = body_of(request)
        model, turns = body.get("model"), body.get("turns")
        if not isinstance(model, str) or not isinstance(turns, list):
            raise ApiError(400, 'expected {"model": string, "turns": [turn, ...]}')
        try:
            self.fake.script(model, turns)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return web.json_response({"ok": True, "pending": self.fake.pending_turns(model)})

    async def default(self, request: web.Request) -> web.StreamResponse:
        """`POST /admin/default`: the default scenario by name."""
        scenario = body_of(request).get("scenario")
        if not isinstance(scenario, str) or scenario not in SCENARIOS:
            raise ApiError(400, f'expected {{"scenario": one of {sorted(SCENARIOS)}}}')
        self.fake.set_default(scenario)
        return web.json_response({"ok": True})

    async def faults(self, request: web.Request) -> web.StreamResponse:
        """`GET /admin/faults`: the active rules with their counters."""
        return web.json_response({"faults": [r.to_dict() for r in self.fake.fault_rules()]})

    async def add_fault(self, request: web.Request) -> web.StreamResponse:
        """`POST /admin/faults`: add a rule (the arguments of `FakeOpenAI.fault`)."""
        body = body_of(request)
        allowed = {
            "kind",
            "count",
            "every",
            "model",
            "api",
            "endpoint",
            "retry_after",
            "delay",
            "rate",
            "seed",
            "after_chunks",
            "after_fraction",
        }
        unknown = set(body) - allowed
        if unknown or not isinstance(body.get("kind"), str | int):
            raise ApiError(400, f"expected a 'kind' and only the fields {sorted(allowed)}")
        options = {k: v for k, v in body.items() if k != "kind"}
        try:
            rule = self.fake.fault(str(body["kind"]), **options)
        except (TypeError, ValueError) as error:
            raise ApiError(400, str(error)) from None
        return web.json_response({"ok": True, "fault": rule.to_dict()})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """`POST /admin/stream`: `{"chunk_delay": seconds}` before each streamed chunk."""
        delay = body_of(request).get("chunk_delay")
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ApiError(400, 'expected {"chunk_delay": a number >= 0}')
        self.fake.chunk_delay = float(delay)
        return web.json_response({"ok": True, "chunk_delay": self.fake.chunk_delay})

    async def clear_faults(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /admin/faults`: remove every rule."""
        self.fake.clear_faults()
        return web.json_response({"ok": True})

    async def requests(self, request: web.Request) -> web.StreamResponse:
        """`GET /admin/requests`: every recorded request, oldest first."""
        return web.json_response({"requests": [r.to_dict() for r in self.fake.requests]})

    async def calls(self, request: web.Request) -> web.StreamResponse:
        """`GET /admin/calls`: `{"calls": n}`, filtered like `FakeOpenAI.calls`."""
        query = request.query
        endpoint = query.get("endpoint")
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ApiError(400, f"unknown endpoint {endpoint!r}", param="endpoint")
        count = self.fake.calls(model=query.get("model"), api=query.get("api"), endpoint=endpoint)
        return web.json_response({"calls": count})

    async def webhooks(self, request: web.Request) -> web.StreamResponse:
        """`POST /admin/webhooks`: send signed webhooks (the arguments of
        `FakeOpenAI.configure_webhooks`)."""
        body = body_of(request)
        allowed = {"url", "secret", "drop_rate", "duplicate_rate", "seed", "retry_delays", "also"}
        unknown = set(body) - allowed
        if (
            unknown
            or not isinstance(body.get("url"), str)
            or not isinstance(body.get("secret"), str)
        ):
            raise ApiError(
                400, f"expected a 'url', a 'secret' and only the fields {sorted(allowed)}"
            )
        options = {k: v for k, v in body.items() if k not in ("url", "secret")}
        try:
            self.fake.configure_webhooks(body["url"], body["secret"], **options)
        except (TypeError, ValueError) as error:
            raise ApiError(400, str(error)) from None
        return web.json_response({"ok": True})

    async def stop_webhooks(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /admin/webhooks`: send no more webhooks."""
        self.fake.stop_webhooks()
        return web.json_response({"ok": True})

    async def deliveries(self, request: web.Request) -> web.StreamResponse:
        """`GET /admin/webhooks`: every webhook event so far."""
        return web.json_response(
            {"deliveries": [d.to_dict() for d in self.fake.webhook_deliveries]}
        )

    async def reset(self, request: web.Request) -> web.StreamResponse:
        """`POST /admin/reset`: forget scripts, faults, records and stored objects."""
        self.fake.reset()
        return web.json_response({"ok": True})

    async def health(self, request: web.Request) -> web.StreamResponse:
        """`GET /health`: `{"ok": true}` once listening."""
        return web.json_response({"ok": True})
