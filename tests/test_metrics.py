"""Prometheus metrics: counters and histograms that move as a real worker on Azurite handles,
retries and dead-letters messages (scraped over HTTP from ``/metrics``), and the pieces that
report them (backend and tool wrappers, the queue depth poller) on their own.
"""

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from handlers.tool_calls import ToolCall, run_tool_calls
from handlers.tools import ToolRegistry, tool
from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    create_body,
    eventually,
    model_env,
    poison_letters,
    post_body,
    runs_finished,
    serving,
)
from tests.support.scrape import (
    Samples,
    fetch,
    http_settings,
    parse_metrics,
    scrape,
    total,
    value,
)
from worker.app import build_backends, open_app
from worker.backends.base import ModelError, TurnRequest
from worker.backends.clients import ModelClients
from worker.loop.errors import DEAD_LETTER_TYPES
from worker.observability.depth import DepthPoller
from worker.observability.instrument import InstrumentedBackend
from worker.observability.metrics import Metrics
from worker.queues.memory import MemoryBroker
from worker.runs.model import ModelTurn, Pending, Usage
from worker.testing import FakeOpenAI

QUESTION = "What's the weather like right now in my favorite city?"
MESSAGES = "assistant_worker_messages_total"
HANDLER = "assistant_worker_handler_duration_seconds"
MODEL = "assistant_worker_model_call_duration_seconds"
DEAD_LETTERS = "assistant_worker_dead_letters_total"


def test_worker_metrics_move_as_messages_are_handled(storage: StorageEnv) -> None:
    """One weather-bot run, a post for a chat that never comes (retried, then dead-lettered
    after the create grace) and a body that is not JSON (dead-lettered at once): each message
    counted by queue, type and outcome, the handler histogram, the dead letters by error
    type, three model calls (one 429 first) with their tokens, the three tools, storage
    requests by service and method, and the depth of the poison queue."""
    chat_id = f"metrics-{storage.suffix}"

    async def scenario() -> tuple[Samples, list[dict[str, Any]]]:
        async with FakeOpenAI() as fake:
            fake.fault("429", count=1, retry_after=0, model="weather-bot")
            settings = http_settings(storage, **model_env(fake.base_url), WORKER_CREATE_GRACE="4")
            async with serving(settings) as app:
                assert app.http is not None
                await storage.send(create_body(chat_id, storage.table))
                await storage.send(post_body(chat_id, storage.table, QUESTION))
                await storage.send(post_body(f"ghost-{storage.suffix}", storage.table, "hi"))
                await storage.send("this is not JSON")

                async def settled() -> bool:
                    samples = await scrape(app)
                    dead = total(samples, MESSAGES, outcome="dead_lettered")
                    return dead >= 2 and await run_ended(storage, chat_id)

                await eventually(settled, 45, "the run and two dead letters")
                # Let the loop finish the runs-queue steps still in flight.
                await eventually(lambda: idle(app), 15, "no message in flight")
                await app.http.refresh_depth()
                samples = await scrape(app)
            letters = await poison_letters(storage, storage.requests_poison)
            return samples, letters

    samples, letters = run(scenario())
    requests = storage.requests_queue

    # Messages by queue, type and outcome.
    assert (
        value(samples, MESSAGES, queue=requests, type="assistantCreate", outcome="completed") == 1
    )
    assert value(samples, MESSAGES, queue=requests, type="assistantPost", outcome="completed") == 1
    assert value(samples, MESSAGES, queue=requests, type="assistantPost", outcome="retried") >= 1
    assert (
        value(samples, MESSAGES, queue=requests, type="assistantPost", outcome="dead_lettered") == 1
    )
    assert value(samples, MESSAGES, queue=requests, type="unknown", outcome="dead_lettered") == 1
    assert total(samples, MESSAGES, outcome="lease_lost") == 0

    # Dead letters by the error type their envelope names.
    error_types = sorted(letter["deadLetter"]["errorType"] for letter in letters)
    assert len(error_types) == 2, letters
    for error_type in set(error_types):
        assert value(
            samples, "assistant_worker_dead_letters_total", queue=requests, error_type=error_type
        ) == error_types.count(error_type)

    # The handler histogram: one observation per message, in the buckets and the sum.
    labels = {"queue": requests, "type": "assistantCreate"}
    assert value(samples, f"{HANDLER}_count", **labels) == 1
    assert value(samples, f"{HANDLER}_sum", **labels) > 0
    assert value(samples, f"{HANDLER}_bucket", le="+Inf", **labels) == 1

    # Model calls: the 429, then three answers (favourite city, nickname + weather, text).
    model = {"api": "chat", "model": "weather-bot"}
    assert value(samples, f"{MODEL}_count", outcome="transient_error", **model) == 1
    assert value(samples, f"{MODEL}_count", outcome="answered", **model) == 3
    tokens_in = value(samples, "assistant_worker_model_tokens_total", kind="input", **model)
    tokens_out = value(samples, "assistant_worker_model_tokens_total", kind="output", **model)
    assert tokens_in > 0 and tokens_out > 0

    # Tools, each executed once and succeeded.
    for name in ("getUserFavoriteCity", "getCityNickname", "getWeatherAtLocation"):
        assert value(samples, "assistant_worker_tool_calls_total", tool=name, outcome="ok") == 1

    # Storage requests: receives, deletes and sends on queues; reads and transactions on tables.
    storage_requests = "assistant_worker_storage_requests_total"
    assert total(samples, storage_requests, service="queue", method="GET") >= 1
    assert total(samples, storage_requests, service="queue", method="DELETE") >= 4
    assert total(samples, storage_requests, service="queue", method="POST") >= 2
    assert total(samples, storage_requests, service="table", method="POST", status="202") >= 2
    assert total(samples, storage_requests, service="table", method="GET", status="404") >= 1

    # Gauges: nothing in flight, the poison queue holds the two dead letters, not paused.
    assert value(samples, "assistant_worker_in_flight_messages") == 0
    assert value(samples, "assistant_worker_queue_depth", queue=storage.requests_poison) == 2
    assert value(samples, "assistant_worker_queue_depth", queue=requests) == 0
    assert value(samples, "assistant_worker_storage_paused") == 0


async def run_ended(storage: StorageEnv, chat_id: str) -> bool:
    try:
        return await runs_finished(storage, chat_id, storage.table, 1) is not None
    except ResourceNotFoundError:  # the table is not created yet
        return False


async def idle(app: Any) -> bool:
    return value(await scrape(app), "assistant_worker_in_flight_messages") == 0


def test_runs_are_counted_by_status_and_api(storage: StorageEnv) -> None:
    """A run that ends is counted once in assistant_worker_runs_total by its status and API
    (from the run_status and api the step handler reports)."""
    chat_id = f"runs-{storage.suffix}"

    async def scenario() -> Samples:
        async with FakeOpenAI() as fake:
            settings = http_settings(storage, **model_env(fake.base_url))
            async with serving(settings) as app:
                await storage.send(create_body(chat_id, storage.table))
                await storage.send(post_body(chat_id, storage.table, QUESTION))

                async def counted() -> Samples | None:
                    samples = await scrape(app)
                    return samples if total(samples, "assistant_worker_runs_total") else None

                await eventually(counted, 30, "a run counted")
                await eventually(lambda: idle(app), 15, "no message in flight")
                return await scrape(app)

    samples = run(scenario())
    assert total(samples, "assistant_worker_runs_total") == 1
    assert value(samples, "assistant_worker_runs_total", status="completed", api="chat") == 1
    # The run's steps were taken in-process after its post (none went through the queue).
    assert value(samples, "assistant_worker_steps_in_process_total", outcome="completed") >= 1
    assert not total(samples, "assistant_worker_messages_total", type="runStep")


def test_a_fresh_worker_reports_zero_dead_letters_and_no_created_series(
    storage: StorageEnv,
) -> None:
    """Before anything happened, /metrics has the dead-letter counter at 0 for every work
    queue and documented error type (so that ``increase()`` sees the first one), and no
    ``_created`` series beside the counters."""

    async def scenario() -> str:
        async with serving(http_settings(storage)) as app:
            reply = await fetch(app, "/metrics")
            assert reply.status == 200
            return reply.text

    text = run(scenario())
    samples = parse_metrics(text)
    for queue in (storage.requests_queue, storage.runs_queue, storage.deadlines_queue):
        for error_type in DEAD_LETTER_TYPES:
            key = (DEAD_LETTERS, frozenset({("queue", queue), ("error_type", error_type)}))
            assert samples.get(key) == 0.0, (queue, error_type)
    assert "_created" not in text


def test_every_metric_is_in_the_operations_table() -> None:
    """docs/operations.md 7.1 has a row per metric (``steps_in_process_total`` included)."""
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("### 7.1 Metrics") : text.index("### 7.2 Alerts")]
    documented = set(re.findall(r"^\| `(assistant_worker_\w+)`", table, re.MULTILINE))
    exposed = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in Metrics().registry.collect()
    }
    assert documented == exposed


def test_metrics_are_off_without_the_http_port(storage: StorageEnv) -> None:
    """Without WORKER_HTTP_PORT there is no server, no metrics, and the backends and tools
    are the plain ones."""

    settings = storage.settings()
    registry = ToolRegistry([shout])

    async def scenario() -> None:
        async with open_app(settings, tools=registry) as app:
            assert app.metrics is None and app.http is None
            spec = registry.get("shout")
            assert spec is not None and spec.function is shout
            assert app.health.ready() == (
                False,
                ["the work queues are not yet checked or created"],
            )
            backends = build_backends(ModelClients(settings))
            assert not any(isinstance(b, InstrumentedBackend) for b in backends.values())
            assert all(
                isinstance(b, InstrumentedBackend)
                for b in build_backends(ModelClients(settings), Metrics()).values()
            )

    run(scenario())


# --- the wrappers on their own ---------------------------------------------------------------


@tool
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@tool
def broken() -> str:
    """Always fails."""
    raise RuntimeError("broken on purpose")


@tool
async def sleepy(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return "awake"


def test_tool_observer_reports_each_execution() -> None:
    """The registry's observer sees every executed call with its outcome (ok, error,
    cancelled for a timeout); calls rejected before running are not executions. Without an
    observer the registry hands out the registered spec itself."""
    registry = ToolRegistry([shout, broken, sleepy])
    seen: list[tuple[str, str]] = []
    registry.set_observer(lambda name, outcome, seconds: seen.append((name, outcome)))
    calls = [
        ToolCall("1", "shout", json.dumps({"text": "hi"})),
        ToolCall("2", "broken", "{}"),
        ToolCall("3", "sleepy", json.dumps({"seconds": 5})),
        ToolCall("4", "shout", json.dumps({"nope": 1})),
        ToolCall("5", "missing", "{}"),
    ]
    results = asyncio.run(run_tool_calls(registry, calls, allowed=None, timeout=0.2))
    assert [r.ok for r in results] == [True, False, False, False, False]
    assert results[0].output == "HI"
    assert sorted(seen) == [("broken", "error"), ("shout", "ok"), ("sleepy", "cancelled")]

    registry.set_observer(None)
    assert registry.get("shout") is not None
    assert registry.get("shout").function is shout  # type: ignore[union-attr]


@dataclass
class ScriptedBackend:
    """A backend that answers from a list (our own protocol, not an SDK)."""

    answers: list[ModelTurn | Pending | Exception]
    name: str = "chat"
    calls: list[str] = field(default_factory=list)
    extra: str = "delegated"

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        self.calls.append("begin")
        return self._next()

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        self.calls.append("poll")
        return self._next()

    async def cancel(self, request: TurnRequest) -> None:
        self.calls.append("cancel")

    def _next(self) -> ModelTurn | Pending:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_instrumented_backend_times_calls_and_counts_tokens() -> None:
    """Each begin/poll is observed with its outcome; tokens come from the answer's usage;
    errors pass through unchanged; other attributes are the backend's."""
    backend = ScriptedBackend(
        [
            Pending(handle={"id": "r1"}),
            ModelTurn(content="hi", usage=Usage(11, 7, 18)),
            ModelError("slow down", transient=True),
            ModelError("bad request", transient=False),
        ]
    )
    metrics = Metrics()
    wrapped = InstrumentedBackend(backend, metrics)
    request = TurnRequest(chat_id="c", run_id="r", model="m1", messages=())

    async def calls() -> None:
        assert isinstance(await wrapped.begin(request), Pending)
        assert isinstance(await wrapped.poll(request), ModelTurn)
        with pytest.raises(ModelError, match="slow down"):
            await wrapped.begin(request)
        with pytest.raises(ModelError, match="bad request"):
            await wrapped.begin(request)
        await wrapped.cancel(request)

    asyncio.run(calls())
    assert backend.calls == ["begin", "poll", "begin", "begin", "cancel"]
    assert (wrapped.name, wrapped.extra) == ("chat", "delegated")
    assert wrapped.wrapped is backend
    samples = parse_metrics(metrics.render().decode())
    for outcome in ("pending", "answered", "transient_error", "error"):
        assert value(samples, f"{MODEL}_count", api="chat", model="m1", outcome=outcome) == 1
    tokens = "assistant_worker_model_tokens_total"
    assert value(samples, tokens, api="chat", model="m1", kind="input") == 11
    assert value(samples, tokens, api="chat", model="m1", kind="output") == 7


def test_depth_poller_refreshes_on_its_interval() -> None:
    """The queue depth gauge follows the queues every interval while the poller runs."""

    async def scenario() -> None:
        broker, metrics = MemoryBroker(), Metrics()
        poller = DepthPoller(broker, ["work", "work-poison"], metrics, interval=0.05)
        poller.start()
        try:
            broker.queue("work").put("{}")
            broker.queue("work").put("{}")

            async def two() -> bool:
                samples = parse_metrics(metrics.render().decode())
                return value(samples, "assistant_worker_queue_depth", queue="work") == 2

            await eventually(two, 5, "the depth gauge to show 2")
        finally:
            await poller.stop()
        samples = parse_metrics(metrics.render().decode())
        assert value(samples, "assistant_worker_queue_depth", queue="work-poison") == 0

    asyncio.run(scenario())


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.observe_message("completed", {"queue": "q", "type": "t"}, None)
    assert b'queue="q"' in first.render()
    assert b'queue="q"' not in second.render()


def test_streamed_runs_count_their_deltas_and_time_the_first(storage: StorageEnv) -> None:
    """A streamed run: assistant_worker_stream_deltas_total by sink and outcome, and the time
    from each model call's start to its first delta (which waits the coalescing interval)."""
    chat_id = f"streamed-{storage.suffix}"
    replies = f"mreplies-{storage.suffix}"

    async def scenario() -> Samples:
        async with FakeOpenAI(chunk_delay=0.01) as fake:
            settings = http_settings(
                storage, **model_env(fake.base_url), WORKER_STREAM_INTERVAL_MS="50"
            )
            async with serving(settings) as app:
                await app.broker.ensure_queues([replies])
                await storage.send(create_body(chat_id, storage.table))
                await storage.send(
                    post_body(chat_id, storage.table, QUESTION, replyTo=replies, stream=True)
                )

                async def counted() -> Samples | None:
                    samples = await scrape(app)
                    return samples if total(samples, "assistant_worker_runs_total") else None

                # The run's end is counted (the chat's table may not exist before the create).
                await eventually(counted, 30, "the run counted")
                await eventually(lambda: idle(app), 15, "no message in flight")
                return await scrape(app)

    samples = run(scenario())
    sent = value(samples, "assistant_worker_stream_deltas_total", sink="queue", outcome="sent")
    assert sent >= 3, "at least the last delta of each of the three model calls"
    assert not total(samples, "assistant_worker_stream_deltas_total", outcome="failed")
    first = "assistant_worker_stream_first_delta_seconds"
    assert value(samples, f"{first}_count", api="chat", sink="queue") == 3
    assert value(samples, f"{first}_sum", api="chat", sink="queue") > 0
