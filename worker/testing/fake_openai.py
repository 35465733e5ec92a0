"""A fake OpenAI-compatible HTTP server for tests, benchmarks and the offline demo.

It serves Chat Completions, the Responses API (with background mode) and the Assistants API v2
under `/v1/...`, under Azure OpenAI's v1 path `/openai/v1/...`, and under Azure's dated paths
(`/openai/...`, `/openai/deployments/{deployment}/chat/completions`; `api-version` is ignored).
Any `Authorization: Bearer` or `api-key` header is accepted; only its presence is recorded.
With `configure_webhooks`, it sends signed webhooks when a background response ends, as OpenAI
and Azure OpenAI do (with retries, and seeded drops and duplicates: see `fake_openai_webhooks`).

What the model answers is scripted per model name or comes from a built-in scenario (see
`fake_openai_brain`); deterministic faults (429, 500, slow, dropped connection) are injected per
rule (see `fake_openai_faults`). Everything can be driven from Python or over HTTP (`/admin/...`).

In a test::

    with FakeOpenAI(background_delay=0.05).running_in_thread() as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
        ...

or ``async with FakeOpenAI() as fake:`` inside a running event loop. From a shell::

    python -m worker.testing.fake_openai --port 8089 --scenario weather
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Self, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from worker.testing.fake_openai_admin import AdminApi
from worker.testing.fake_openai_assistants import AssistantsApi
from worker.testing.fake_openai_brain import SCENARIOS, Scenario, Turn
from worker.testing.fake_openai_chat import ChatApi
from worker.testing.fake_openai_common import ApiError, RecordedRequest, new_id
from worker.testing.fake_openai_core import CURRENT_BODY, CURRENT_RECORD, FakeCore
from worker.testing.fake_openai_faults import GENERATING, FaultRule
from worker.testing.fake_openai_responses import ResponsesApi
from worker.testing.fake_openai_webhooks import Delivery, WebhookConfig

__all__ = ["FakeOpenAI", "RecordedRequest", "main"]

log = logging.getLogger(__name__)

# Every API route is served under each of these prefixes.
PREFIXES = ("/v1", "/openai/v1", "/openai")


def _had_auth(request: web.Request) -> bool:
    authorization = request.headers.get("Authorization", "")
    bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    return bool(bearer or request.headers.get("api-key", "").strip())


class FakeOpenAI:
    """The fake server. Configure it before or while it runs; inspect what it received.

    `background_delay` is how long a background response or a run takes (seconds);
    `run_expiry` is when an unfinished run expires; `scenario` answers models whose name picks
    none (`"echo"` or `"weather"`); `chunk_delay` is the wait before each streamed chunk of
    text or arguments (0.05: 20 chunks a second).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        background_delay: float = 0.3,
        run_expiry: float = 600.0,
        scenario: str | Scenario = "echo",
        chunk_delay: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self._core = FakeCore(
            background_delay=background_delay,
            run_expiry=run_expiry,
            scenario=scenario,
            chunk_delay=chunk_delay,
        )
        self._chat = ChatApi(self._core)
        self._responses = ResponsesApi(self._core)
        self._assistants = AssistantsApi(self._core)
        self._runner: web.AppRunner | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://HOST:PORT` (the Azure endpoint, `AZURE_OPENAI_ENDPOINT`)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """`url + "/v1"`, the OpenAI client's `base_url`."""
        return self.url + "/v1"

    @property
    def azure_base_url(self) -> str:
        """`url + "/openai/v1/"`, the Azure OpenAI v1 `base_url`."""
        return self.url + "/openai/v1/"

    # -- settings -------------------------------------------------------------------------------

    @property
    def background_delay(self) -> float:
        """Seconds a background response or a run takes to finish (changeable at any time)."""
        return self._core.background_delay

    @background_delay.setter
    def background_delay(self, value: float) -> None:
        self._core.background_delay = value

    @property
    def chunk_delay(self) -> float:
        """Seconds before each streamed chunk of text or arguments (changeable at any time)."""
        return self._core.chunk_delay

    @chunk_delay.setter
    def chunk_delay(self, value: float) -> None:
        self._core.chunk_delay = value

    @property
    def run_expiry(self) -> float:
        """Seconds after which an unfinished run is `expired` (changeable at any time)."""
        return self._core.run_expiry

    @run_expiry.setter
    def run_expiry(self, value: float) -> None:
        self._core.run_expiry = value

    @property
    def include_supported(self) -> bool:
        """False: the Responses API refuses `include` (400), as a service that lacks it."""
        return self._core.include_supported

    @include_supported.setter
    def include_supported(self, value: bool) -> None:
        self._core.include_supported = value

    def expire_responses(self) -> int:
        """Forget every stored response, as the service forgets background responses some
        minutes after they end (a `previous_response_id` to one is then a 400). The reasoning
        items' encrypted content still decrypts. Returns how many were forgotten."""
        return self._responses.expire()

    # -- webhooks -------------------------------------------------------------------------------

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
    ) -> None:
        """Send a signed webhook to `url` whenever a background response ends (`secret`:
        `whsec_<base64>`). `drop_rate`/`duplicate_rate`: the share of events never sent / sent
        twice, drawn from `random.Random(seed)`; a failed attempt is retried after each of
        `retry_delays` seconds. `also`: more URLs of the endpoint, each attempt to the next
        in turn (replicas behind a load balancer). Raises `ValueError` for a bad argument."""
        config = WebhookConfig(
            url,
            secret,
            also=tuple(also),
            drop_rate=drop_rate,
            duplicate_rate=duplicate_rate,
            seed=seed,
            retry_delays=tuple(float(d) for d in retry_delays),
        )
        self._core.webhooks.configure(config)

    def stop_webhooks(self) -> None:
        """Send no more webhooks (those in flight still go)."""
        self._core.webhooks.configure(None)

    @property
    def webhook_deliveries(self) -> list[Delivery]:
        """Every webhook event so far, oldest first (dropped ones included, marked)."""
        return self._core.webhooks.snapshot()

    # -- scripting, faults, inspection ----------------------------------------------------------

    def script(self, model: str, turns: Sequence[Turn]) -> None:
        """Queue what `model` answers next, one turn per model call, in order.

        A turn is `{"content": "text"}` and/or `{"tool_calls": [{"name": "f", "arguments":
        {...}}]}`; `model="*"` serves any model without its own queue. Raises `ValueError` for a
        malformed turn (and queues none of them).
        """
        self._core.brain.script(model, turns)

    def pending_turns(self, model: str | None = None) -> int:
        """Scripted turns not consumed yet (for one model, or all)."""
        return self._core.brain.pending(model)

    def set_default(self, scenario: str | Scenario) -> None:
        """The scenario for unscripted models whose name picks none: a name or a callable
        `(Conversation) -> turn`."""
        self._core.brain.set_default(scenario)

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
    ) -> FaultRule:
        """Inject a fault into matching model calls; returns the rule (its `seen`/`fired` count).

        `kind`: `"429"` (Retry-After `retry_after` seconds, default 1), `"500"`, `"slow"` (sleep
        `delay` seconds, default 1, then answer), `"drop"` (close the connection unanswered).
        `count=N`: the next N matching calls; `every=K`: every K-th matching call; both: every
        K-th, N times; neither: every matching call until `clear_faults`. Filters: `model`,
        `api` (`chat`, `responses`, `assistants`) and `endpoint` (`chat.create`,
        `responses.create`, `responses.retrieve`, `runs.create`, `runs.submit`,
        `runs.retrieve`); all endpoints by default. `rate=P`: each due call fires with
        probability P from the rule's own `random.Random(seed)` (deterministic per seed).
        `after_chunks=N` / `after_fraction=F`: a mid-stream fault, for streamed calls only,
        once N chunks (or that share of the call's chunks) of text or arguments were sent:
        `drop` closes the connection, `429`/`500` send an error event, `slow` stalls.
        """
        return self._core.faults.add(
            kind,
            count=count,
            every=every,
            model=model,
            api=api,
            endpoint=endpoint,
            retry_after=retry_after,
            delay=delay,
            rate=rate,
            seed=seed,
            after_chunks=after_chunks,
            after_fraction=after_fraction,
        )

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._core.faults.clear()

    def fault_rules(self) -> list[FaultRule]:
        """The fault rules still active (exhausted `count` rules are gone)."""
        return self._core.faults.rules()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every API request received so far (admin calls excluded), oldest first."""
        with self._core.lock:
            return list(self._core.records)

    def calls(
        self,
        model: str | None = None,
        api: str | None = None,
        endpoint: str | Sequence[str] | None = None,
    ) -> int:
        """How many model calls were received (faulted attempts included).

        By default the calls that make the model answer (`chat.create`, `responses.create`,
        `runs.create`, `runs.submit`); pass `endpoint` to count polls (`responses.retrieve`...).
        """
        if endpoint is None:
            wanted = set(GENERATING)
        else:
            wanted = {endpoint} if isinstance(endpoint, str) else set(endpoint)
        with self._core.lock:
            return sum(
                1
                for r in self._core.records
                if r.endpoint in wanted
                and (model is None or r.model == model)
                and (api is None or r.api == api)
            )

    def reset(self) -> None:
        """Forget scripts, faults, records and every stored object; restore the default
        scenario."""
        with self._core.lock:
            self._core.brain.reset()
            self._core.faults.clear()
            self._core.records.clear()
            self._responses.reset()
            self._assistants.reset()
            self._core.webhooks.reset()

    # -- the application ------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (to embed the fake in another aiohttp server or test client)."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        for api in (self._chat, self._responses, self._assistants):
            for method, path, handler in api.routes():
                for prefix in PREFIXES:
                    app.router.add_route(method, prefix + path, handler)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat.create)
        for method, path, handler in AdminApi(self).routes():
            app.router.add_route(method, path, handler)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        is_admin = request.path.startswith("/admin/") or request.path == "/health"
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            had_auth=_had_auth(request),
            query=request.query_string,
        )
        if not is_admin:
            self._core.record(record)
        CURRENT_RECORD.set(record)
        CURRENT_BODY.set(None)
        try:
            raw = await request.read()
            if raw:
                try:
                    record.json = json.loads(raw)
                except ValueError:
                    raise ApiError(
                        400,
                        "We could not parse the JSON body of your request. (HINT: This likely "
                        "means you aren't using your HTTP library correctly. The OpenAI API "
                        "expects a JSON payload.)",
                    ) from None
            CURRENT_BODY.set(record.json)
            response = await handler(request)
        except ApiError as error:
            response = error.response()
        except web.HTTPException as error:
            # Unknown routes and methods, answered with the API's error shape.
            response = ApiError(
                error.status,
                f"Invalid URL ({request.method} {request.path})"
                if error.status in (404, 405)
                else error.reason,
            ).response()
        except Exception:
            log.exception("fake OpenAI: unexpected error on %s %s", request.method, request.path)
            response = ApiError(
                500, "The fake OpenAI server failed on this request.", type="server_error"
            ).response()
        response.headers.setdefault("x-request-id", new_id("req", length=32))
        record.status = response.status
        return response

    # -- running --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (on a free port when `port` is 0) and serve on the running event loop."""
        if self._runner is not None:
            raise RuntimeError("the fake OpenAI server is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        # handler_cancellation: a client that gives up on a `slow` call cancels its handler;
        # shutdown_timeout: stopping never waits long for such handlers.
        runner = web.AppRunner(
            self.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving (idempotent); open connections are closed."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await self._core.webhooks.close()
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self, timeout: float = 10.0) -> Iterator[Self]:
        """Serve from a daemon thread with its own event loop, for sync code.

        Start and stop each wait at most `timeout` seconds (`TimeoutError` when start does not
        finish in time).
        """
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as error:  # reported to the starting thread
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=serve, name=f"fake-openai-{id(self):x}", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the fake OpenAI server did not start within {timeout} s")
        if failure:
            thread.join(timeout)
            raise failure[0]
        try:
            yield self
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)


def load_scenario(spec: str) -> Scenario:
    """`module:function` imported and returned (a callable `(Conversation) -> turn`)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r}")
    value = getattr(importlib.import_module(module_name), attribute)
    if not callable(value):
        raise ValueError(f"{spec} is not callable")
    return cast(Scenario, value)


async def _serve(args: argparse.Namespace) -> None:
    scenario: str | Scenario = args.scenario
    if args.scenario_callable:
        scenario = load_scenario(args.scenario_callable)
    fake = FakeOpenAI(
        args.host,
        args.port,
        background_delay=args.background_delay,
        run_expiry=args.run_expiry,
        scenario=scenario,
        chunk_delay=args.chunk_delay,
    )
    if args.webhook_url:
        fake.configure_webhooks(
            args.webhook_url[0],
            args.webhook_secret,
            also=args.webhook_url[1:],
            drop_rate=args.webhook_drop_rate,
            duplicate_rate=args.webhook_duplicate_rate,
            seed=args.webhook_seed,
        )
    for spec in args.fault or ():
        options = json.loads(spec)
        if not isinstance(options, dict) or not isinstance(options.get("kind"), str):
            raise ValueError(f"--fault wants a JSON object with a 'kind', got {spec!r}")
        fake.fault(**options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
            loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(json.dumps({"url": fake.url, "base_url": fake.base_url}), flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve until SIGTERM/SIGINT; prints `{"url", "base_url"}` once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.testing.fake_openai",
        description="A fake OpenAI-compatible server (Chat Completions, Responses, Assistants).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="echo")
    parser.add_argument("--background-delay", type=float, default=0.3, metavar="SECONDS")
    parser.add_argument("--run-expiry", type=float, default=600.0, metavar="SECONDS")
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait before each streamed chunk of text or arguments (0.05: 20 a second)",
    )
    parser.add_argument(
        "--scenario-callable",
        metavar="MODULE:FUNCTION",
        help="the default scenario as an importable callable (Conversation) -> turn",
    )
    parser.add_argument(
        "--fault",
        action="append",
        metavar="JSON",
        help='a fault rule, as the body of POST /admin/faults: \'{"kind": "500", "rate": 0.1, '
        '"seed": 1}\' (repeatable)',
    )
    parser.add_argument(
        "--webhook-url",
        action="append",
        help="send signed webhooks there when responses end (repeat: each attempt to the next)",
    )
    parser.add_argument("--webhook-secret", default="", help="whsec_<base64> signing secret")
    parser.add_argument("--webhook-drop-rate", type=float, default=0.0, metavar="P")
    parser.add_argument("--webhook-duplicate-rate", type=float, default=0.0, metavar="P")
    parser.add_argument("--webhook-seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
