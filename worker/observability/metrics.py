"""Prometheus metrics of one worker (SPEC §10), in a registry of their own.

Every ``Metrics`` has its own ``CollectorRegistry`` (nothing is registered globally), so tests
and several workers in one process never share counters. The worker, the backends, the tool
registry and the storage clients report through the small methods here; with metrics off they
get ``None`` and report nothing.
"""

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from worker.observability.health import Health

# What happened to a message (the loop's outcomes; ``ack_failed``: the delete or release
# failed and the message reappears when its lease expires).
MESSAGE_OUTCOMES = (
    "completed",
    "retried",
    "resent",
    "dead_lettered",
    "lease_lost",
    "abandoned",
    "ack_failed",
)

# Seconds: handlers take milliseconds (a create) to minutes (a run step with slow tools).
HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Seconds: model calls take from tens of milliseconds (a poll) to minutes.
MODEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
# Seconds a timer of the event loop fired late: about 0 when healthy; 1 and above is a loop
# held by one callback (nothing else runs meanwhile: leases, probes, other messages).
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Seconds from a streamed model call's start to its first delta sent: the model's time to
# first token plus the coalescing interval (250 ms by default).
FIRST_DELTA_BUCKETS = (0.1, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)

UNKNOWN = "unknown"


class Metrics:
    """The worker's metrics; ``render()`` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # No `<counter>_created` series beside each counter and histogram: they double the
        # scrape and nothing here reads them (a process-wide switch of prometheus-client).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.messages = Counter(
            "assistant_worker_messages",
            "Messages handled, by queue, message type and outcome "
            "(completed, retried, resent, dead_lettered, lease_lost, abandoned, ack_failed).",
            ["queue", "type", "outcome"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "assistant_worker_handler_duration_seconds",
            "Seconds from receiving a message to its outcome (handler, sends and ack).",
            ["queue", "type"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "assistant_worker_dead_letters",
            "Messages dead-lettered, by queue and error type.",
            ["queue", "error_type"],
            registry=registry,
        )
        self.runs = Counter(
            "assistant_worker_runs",
            "Runs that ended, by final status and model API.",
            ["status", "api"],
            registry=registry,
        )
        self.steps_in_process = Counter(
            "assistant_worker_steps_in_process",
            "Run steps taken in-process after the message that carries their run, by outcome "
            "(completed; failed: the carrier is retried; handed_off: sent to the runs queue "
            "because the worker is stopping).",
            ["outcome"],
            registry=registry,
        )
        self.model_duration = Histogram(
            "assistant_worker_model_call_duration_seconds",
            "Seconds per model call (begin or poll), by API, model and outcome "
            "(answered, pending, error, transient_error, cancelled).",
            ["api", "model", "outcome"],
            buckets=MODEL_BUCKETS,
            registry=registry,
        )
        self.model_tokens = Counter(
            "assistant_worker_model_tokens",
            "Tokens the model reported, by API, model and kind (input, output).",
            ["api", "model", "kind"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "assistant_worker_tool_calls",
            "Executions of registered tools, by tool and outcome (ok, error, cancelled).",
            ["tool", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "assistant_worker_in_flight_messages",
            "Messages being handled right now.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "assistant_worker_queue_depth",
            "Approximate number of messages in each queue (refreshed periodically).",
            ["queue"],
            registry=registry,
        )
        self.storage_requests = Counter(
            "assistant_worker_storage_requests",
            "Storage HTTP requests (every attempt), by service (queue, table), method and "
            "status code ('error' when no response came).",
            ["service", "method", "status"],
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "assistant_worker_event_loop_lag_seconds",
            "Seconds the event loop's timers fired late, sampled every 0.25 s (about 0 when "
            "healthy; a second or more: one callback held the loop, nothing else ran).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.tool_threads_stuck = Gauge(
            "assistant_worker_tool_threads_stuck",
            "Threads of sync tools whose call was abandoned (it ran past its timeout) and that "
            "have not returned; each was replaced, so tools still run.",
            registry=registry,
        )
        self.stream_deltas = Counter(
            "assistant_worker_stream_deltas",
            "assistantDelta events of streamed runs, by sink (queue, redis) and outcome "
            "(sent; failed: the sink refused it, the run went on).",
            ["sink", "outcome"],
            registry=registry,
        )
        self.stream_first_delta = Histogram(
            "assistant_worker_stream_first_delta_seconds",
            "Seconds from the start of a streamed model call to its first delta sent, by API "
            "and sink.",
            ["api", "sink"],
            buckets=FIRST_DELTA_BUCKETS,
            registry=registry,
        )
        self.webhooks = Counter(
            "assistant_worker_webhooks",
            "Deliveries of the provider's webhooks (POST /webhooks/openai), by outcome "
            "(continued, early, finished, moved_on, unknown, duplicate, ignored, rejected, "
            "busy, failed; late_*: an early one, checked again).",
            ["outcome"],
            registry=registry,
        )
        self.storage_paused = Gauge(
            "assistant_worker_storage_paused",
            "1 while receiving is paused because the worker's own storage is unreachable.",
            registry=registry,
        )

    # --- wiring ---------------------------------------------------------------------------------

    def track_in_flight(self, count: Callable[[], int]) -> None:
        """Read the number of in-flight messages from ``count`` at each scrape."""
        self.in_flight.set_function(lambda: float(count()))

    def track_tool_threads(self, stuck: Callable[[], int]) -> None:
        """Read the number of stuck tool threads from ``stuck`` at each scrape."""
        self.tool_threads_stuck.set_function(lambda: float(stuck()))

    def expect_dead_letters(self, queues: Iterable[str], error_types: Iterable[str]) -> None:
        """Start the dead-letter counter at 0 for each queue and error type: a series that
        appears only with its first dead letter is not seen to increase by ``increase()``,
        and the alert on it would miss that first one."""
        for queue in queues:
            for error_type in error_types:
                self.dead_letters.labels(queue, error_type)

    def track_health(self, health: Health) -> None:
        """Report ``storage_paused`` from ``health`` at each scrape."""
        self.storage_paused.set_function(lambda: 1.0 if health.storage_down else 0.0)

    # --- reports --------------------------------------------------------------------------------

    def observe_message(
        self,
        outcome: str,
        fields: Mapping[str, Any],
        started: float | None,
        error_type: str | None = None,
    ) -> None:
        """One message's outcome. ``fields`` are the loop's log fields (queue, type, and the
        handler's ``log_fields``: a handler that ended a run adds ``run_status`` and ``api``);
        ``started`` is the ``time.monotonic()`` of its receipt, None when unknown."""
        queue = str(fields.get("queue") or UNKNOWN)
        message_type = str(fields.get("type") or UNKNOWN)
        self.messages.labels(queue, message_type, outcome).inc()
        if started is not None:
            self.handler_duration.labels(queue, message_type).observe(time.monotonic() - started)
        if outcome == "dead_lettered":
            self.dead_letters.labels(queue, error_type or UNKNOWN).inc()
        status = fields.get("run_status")
        if status:
            self.runs.labels(str(status), str(fields.get("api") or UNKNOWN)).inc()

    def observe_step(self, outcome: str, fields: Mapping[str, Any]) -> None:
        """A run step taken in-process (no message of its own); a run it ended is counted
        as the end of a run a message reports is (``run_status``, ``api``)."""
        self.steps_in_process.labels(outcome).inc()
        status = fields.get("run_status")
        if status:
            self.runs.labels(str(status), str(fields.get("api") or UNKNOWN)).inc()

    def observe_model_call(
        self,
        api: str,
        model: str,
        outcome: str,
        seconds: float,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        self.model_duration.labels(api, model, outcome).observe(seconds)
        if input_tokens:
            self.model_tokens.labels(api, model, "input").inc(input_tokens)
        if output_tokens:
            self.model_tokens.labels(api, model, "output").inc(output_tokens)

    def observe_tool_call(self, tool: str, outcome: str, seconds: float) -> None:
        self.tool_calls.labels(tool, outcome).inc()

    def observe_event_loop_lag(self, seconds: float) -> None:
        self.event_loop_lag.observe(seconds)

    def observe_delta(self, sink: str, outcome: str) -> None:
        """One delta of a streamed run, sent or failed."""
        self.stream_deltas.labels(sink, outcome).inc()

    def observe_first_delta(self, api: str, sink: str, seconds: float) -> None:
        """A streamed model call's first delta was sent ``seconds`` after the call started."""
        self.stream_first_delta.labels(api, sink).observe(seconds)

    def observe_storage_request(self, service: str, method: str, status: str) -> None:
        self.storage_requests.labels(service, method, status).inc()

    def observe_webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def set_queue_depth(self, queue: str, count: int) -> None:
        self.queue_depth.labels(queue).set(count)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
