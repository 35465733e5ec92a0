"""OpenTelemetry traces (SPEC §10): the SDK set up from the environment, and the worker's spans.

Off unless an exporter is configured; then nothing but the API's no-op tracer exists (the SDK
is not even imported). ``setup_tracing`` reads the standard variables at process start:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): OTLP over HTTP;
- ``APPLICATIONINSIGHTS_CONNECTION_STRING``: Azure Monitor (``configure_azure_monitor()``, the
  optional extra ``assistant-worker[azure-monitor]``);
- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` (JSON on stdout) and/or ``none``;
- ``WORKER_TRACE_FILE``: ours, one JSON line per finished span appended to that file (tests,
  local debugging);
- ``OTEL_SERVICE_NAME`` (default ``assistant-worker``), ``OTEL_SDK_DISABLED``,
  ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (``true``: record message contents,
  tool arguments and results; never otherwise).

The spans: one CONSUMER span per message handled (``process assistantPost``) whose parent is
the message's ``traceparent``, so a run's steps, whichever process takes them, continue the
producer's trace; ``chat {model}`` per model call and ``execute_tool {name}`` per tool call
(GenAI semantic conventions); the Azure SDK's own spans for storage calls (azure-core's native
OpenTelemetry tracing). Storage calls outside a message (idle receives, probes, the depth
poller) would each start a trace of their own: the sampler drops such roots, and leaves the
rest to the configured one (``OTEL_TRACES_SAMPLER``, Azure Monitor's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import Context, copy_context
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.bounded import cap
from schemas.decode import decode_body, infer_type, unwrap_dead_letter
from worker.backends.base import BackendWrapper
from worker.config.settings import SettingsError
from worker.observability.labels import OTHER, BoundedLabels

if TYPE_CHECKING:
    from worker.backends.base import Backend, TextStream, TurnRequest
    from worker.config.settings import Settings
    from worker.queues.transport import Delivery
    from worker.runs.model import ModelTurn, Pending

T = TypeVar("T")

TRACER_NAME = "assistant_worker"
DEFAULT_SERVICE_NAME = "assistant-worker"
TRACE_FILE_ENV = "WORKER_TRACE_FILE"
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# Azure Storage queues have no name in the messaging conventions' registry yet.
MESSAGING_SYSTEM = "azure_queue"
# Texts recorded on spans (error descriptions; contents when captured) are cut to this.
MAX_ATTRIBUTE_CHARS = 8192
# A model or tool name recorded as a span attribute (a request or a model chose it).
MAX_MODEL_CHARS = 256

_PROPAGATOR = TraceContextTextMapPropagator()


class TracingError(SettingsError):
    """Tracing is configured in a way this worker cannot honour (the message says why)."""


# --- trace context ------------------------------------------------------------------------------


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent``; None when absent or malformed (a
    malformed one starts a new trace: it is not an error)."""
    if not value:
        return None
    context = _PROPAGATOR.extract({"traceparent": value})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def format_traceparent(span_context: SpanContext) -> str | None:
    """``00-{trace id}-{span id}-{flags}``, or None for an invalid context."""
    if not span_context.is_valid:
        return None
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags):02x}"
    )


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span (None when tracing is off)."""
    return format_traceparent(trace.get_current_span().get_span_context())


def run_traceparent(requested: str | None) -> str | None:
    """The trace context a new run records and hands to its steps and replies: the producer's
    (when valid; propagated even when tracing is off), else the current span's, else none."""
    parsed = parse_traceparent(requested)
    if parsed is not None:
        return format_traceparent(parsed)
    return current_traceparent()


def _parent_context(traceparent: str | None) -> otel_context.Context:
    """A context whose parent is the remote ``traceparent``; empty (a new root) otherwise."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return otel_context.Context()
    return trace.set_span_in_context(NonRecordingSpan(parsed))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ATTRIBUTE_CHARS else text[: MAX_ATTRIBUTE_CHARS - 1] + "…"


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


# --- what the app is given ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tracing:
    """Tracing is on: the tracer the worker's spans come from, and whether contents are kept."""

    tracer: Tracer
    capture_content: bool = False
    # Flushes and stops the exporters (at process exit); nothing for a borrowed provider.
    shutdown: Callable[[], None] = field(default=lambda: None, compare=False)

    @classmethod
    def from_provider(
        cls,
        provider: Any,
        *,
        capture_content: bool = False,
        shutdown: Callable[[], None] | None = None,
    ) -> Tracing:
        tracer = provider.get_tracer(TRACER_NAME)
        return cls(tracer, capture_content, shutdown or (lambda: None))


def current_tracing(env: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing through the process's global tracer provider, if an SDK one is installed
    (by ``setup_tracing``, or by a host that configured OpenTelemetry itself); else None."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    env = os.environ if env is None else env
    return Tracing.from_provider(provider, capture_content=_is_true(env.get(CAPTURE_CONTENT_ENV)))


def setup_tracing(env: Mapping[str, str] | None = None) -> Tracing | None:
    """Install the SDK's tracer provider with the exporters the environment names (once, at
    process start); None, and nothing installed, when none is configured."""
    env = os.environ if env is None else env
    if _is_true(env.get("OTEL_SDK_DISABLED")):
        return None
    names = {n.strip().lower() for n in (env.get("OTEL_TRACES_EXPORTER") or "").split(",")}
    names.discard("")
    explicit = bool(names)
    otlp = "otlp" in names or (
        not explicit
        and bool(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
    )
    console = "console" in names
    trace_file = env.get(TRACE_FILE_ENV) or None
    azure_monitor = bool(env.get("APPLICATIONINSIGHTS_CONNECTION_STRING"))
    unknown = names - {"otlp", "console", "none"}
    if unknown:
        raise TracingError(
            f"OTEL_TRACES_EXPORTER names {', '.join(sorted(unknown))}: this worker supports "
            "otlp, console and none"
        )
    if not (otlp or console or trace_file or azure_monitor):
        return None
    capture = _is_true(env.get(CAPTURE_CONTENT_ENV))
    processors = _span_processors(env, otlp=otlp, console=console, trace_file=trace_file)

    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME}
    )
    if azure_monitor:
        try:
            from azure.monitor.opentelemetry import configure_azure_monitor
        except ImportError as error:
            raise TracingError(
                "APPLICATIONINSIGHTS_CONNECTION_STRING is set but azure-monitor-opentelemetry "
                "is not installed: pip install 'assistant-worker[azure-monitor]'"
            ) from error
        # It installs the global providers itself, with Azure SDK tracing on.
        configure_azure_monitor(
            connection_string=env["APPLICATIONINSIGHTS_CONNECTION_STRING"],
            resource=resource,
            span_processors=processors,
        )
        provider: Any = trace.get_tracer_provider()
    else:
        from opentelemetry.sdk.trace import TracerProvider

        # No sampler given: OTEL_TRACES_SAMPLER, else parent-based always-on.
        provider = TracerProvider(resource=resource)
        for processor in processors:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
    if hasattr(provider, "sampler"):
        # Read by every tracer the provider makes from now on (the Azure SDK's included).
        provider.sampler = message_roots(provider.sampler)
    _enable_azure_sdk_tracing(env)
    shutdown = getattr(provider, "shutdown", None)
    return Tracing.from_provider(provider, capture_content=capture, shutdown=shutdown)


def _span_processors(
    env: Mapping[str, str], *, otlp: bool, console: bool, trace_file: str | None
) -> list[Any]:
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    processors: list[Any] = []
    if otlp:
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol != "http/protobuf":
            raise TracingError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: this worker "
                "exports OTLP over HTTP (http/protobuf)"
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporter reads its endpoint, headers and timeout from the environment itself.
        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    if console:
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    if trace_file:
        processors.append(SimpleSpanProcessor(_file_exporter(trace_file)))
    return processors


def message_roots(delegate: Any) -> Any:
    """A sampler that starts traces only at the worker's message spans (CONSUMER) and leaves
    every other decision to ``delegate`` (the configured sampler): a storage call outside a
    message (an idle receive, a probe, a depth poll) is not a trace of its own."""
    from opentelemetry.sdk.trace import sampling

    class MessageRoots(sampling.Sampler):
        def should_sample(
            self,
            parent_context: otel_context.Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Any = None,
            links: Sequence[Any] | None = None,
            trace_state: Any = None,
        ) -> sampling.SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid and kind is not SpanKind.CONSUMER:
                return sampling.SamplingResult(sampling.Decision.DROP)
            result: sampling.SamplingResult = delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
            return result

        def get_description(self) -> str:
            return f"MessageRoots{{{delegate.get_description()}}}"

    return MessageRoots()


def _enable_azure_sdk_tracing(env: Mapping[str, str]) -> None:
    """Storage calls as child spans: azure-core (>= 1.33) traces natively through the
    OpenTelemetry API once ``tracing_enabled`` is on (no plugin; ``tracing_implementation``
    must stay unset). An explicit ``AZURE_TRACING_ENABLED`` wins."""
    if env.get("AZURE_TRACING_ENABLED"):
        return
    from azure.core.settings import settings as azure_settings

    azure_settings.tracing_enabled = True


def _file_exporter(path: str) -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        """One JSON object per finished span, appended to ``path`` (one write per span, so
        several processes may share the file)."""

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            lines = "".join(json.dumps(span_record(span), default=str) + "\n" for span in spans)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode("utf-8"))
            finally:
                os.close(fd)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    return JsonLinesExporter()


def span_record(span: Any) -> dict[str, Any]:
    """A finished SDK span as plain JSON (what ``WORKER_TRACE_FILE`` holds)."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "parent_remote": bool(parent is not None and parent.is_remote),
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": event.name, "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
        "service": (span.resource.attributes or {}).get("service.name"),
        "pid": os.getpid(),
    }


# --- one span per message (the loop) ------------------------------------------------------------


class MessageTracing:
    """The loop's spans: a CONSUMER span per message, current while the message's task runs."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracer = tracing.tracer

    def start(self, delivery: Delivery) -> tuple[Context, Callable[[object], None]]:
        """Start the message's span: a copy of the current context with the span current,
        to run the message's task in, and the task's done callback that ends the span."""
        message_type, traceparent = _peek(delivery.body)
        operation = message_type or delivery.queue
        span = self._tracer.start_span(
            f"process {operation}",
            context=_parent_context(traceparent),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": delivery.queue,
                "messaging.message.id": delivery.message_id,
                "messaging.azure_queue.dequeue_count": delivery.dequeue_count,
                **({"assistant_worker.message.type": message_type} if message_type else {}),
            },
        )
        context = copy_context()
        context.run(otel_context.attach, trace.set_span_in_context(span))

        def end(task: object) -> None:
            if isinstance(task, asyncio.Future) and task.cancelled():
                # Abandoned at shutdown: it reappears for the next worker.
                span.set_attribute("assistant_worker.outcome", "abandoned")
            span.end()

        return context, end

    @contextlib.contextmanager
    def in_process_step(
        self, payload: Mapping[str, Any], queue: str, carrier_id: str
    ) -> Iterator[Callable[[Mapping[str, Any]], None]]:
        """The span of a run step taken in-process (no message of its own): named and
        parented like the span of a ``runStep`` message (the run's trace context), current
        while the step runs; ``assistant_worker.carrier`` names the message it came with.
        Yields what to call with the step's log fields when it completed."""
        traceparent = payload.get("traceparent")
        span = self._tracer.start_span(
            "process runStep",
            context=_parent_context(traceparent if isinstance(traceparent, str) else None),
            kind=SpanKind.INTERNAL,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.destination.name": queue,
                "assistant_worker.message.type": "runStep",
                "assistant_worker.in_process": True,
                "assistant_worker.carrier": carrier_id,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield lambda fields: annotate_outcome(span, "completed", fields)
        finally:
            otel_context.detach(token)
            span.end()

    @staticmethod
    def observing(
        observe: Callable[..., None],
    ) -> Callable[..., None]:
        """The loop's ``observe(outcome, fields, started, error_type=None)``, which also puts
        the outcome on the message's span (the current one where the loop reports it)."""

        def observed(
            outcome: str,
            fields: Mapping[str, Any],
            started: float | None,
            error_type: str | None = None,
        ) -> None:
            annotate_outcome(trace.get_current_span(), outcome, fields, error_type)
            observe(outcome, fields, started, error_type)

        return observed


def _peek(body: str) -> tuple[str | None, str | None]:
    """The message type and ``traceparent`` of a body, if it reads (the handler decodes it
    again and reports what is wrong with it)."""
    try:
        payload = unwrap_dead_letter(decode_body(body))
        message_type = infer_type(payload)
    except Exception:
        return None, None
    traceparent = payload.get("traceparent")
    return message_type, traceparent if isinstance(traceparent, str) else None


_FIELD_ATTRIBUTES = {
    "type": "assistant_worker.message.type",
    "chat_id": "gen_ai.conversation.id",
    "request_id": "assistant_worker.request_id",
    "run_id": "assistant_worker.run_id",
    "run_status": "assistant_worker.run_status",
    "attempt": "messaging.azure_queue.dequeue_count",
}


def annotate_outcome(
    span: Span, outcome: str, fields: Mapping[str, Any], error_type: str | None = None
) -> None:
    """What happened to the message, on its span; dead letters and failed acks are errors."""
    if not span.is_recording():
        return
    span.set_attribute("assistant_worker.outcome", outcome)
    for key, attribute in _FIELD_ATTRIBUTES.items():
        value = fields.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            span.set_attribute(attribute, value)
    if outcome == "dead_lettered":
        span.set_attribute("error.type", error_type or "dead_lettered")
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered ({error_type or 'unknown'})"))
    elif outcome == "ack_failed":
        span.set_attribute("error.type", "ack_failed")
        span.set_status(Status(StatusCode.ERROR, "the message could not be deleted or released"))


# --- model calls (GenAI conventions) ------------------------------------------------------------

PROVIDER_OPENAI = "openai"
PROVIDER_AZURE = "azure.ai.openai"


def model_provider(settings: Settings) -> Callable[[TurnRequest], str]:
    """``gen_ai.provider.name`` of a request: named connections and AZURE_OPENAI_ENDPOINT are
    Azure OpenAI; anything else is OpenAI (or an OpenAI-compatible server)."""
    azure_default = bool(settings.azure_openai_endpoint)

    def provider(request: TurnRequest) -> str:
        return PROVIDER_AZURE if request.ai_connection or azure_default else PROVIDER_OPENAI

    return provider


def finish_reason(turn: ModelTurn) -> str:
    """The finish reason of an answer, in OpenAI's words."""
    if turn.tool_calls:
        return "tool_calls"
    if turn.incomplete is None:
        return "stop"
    text = turn.incomplete.lower()
    if "token" in text or "length" in text:
        return "length"
    if "filter" in text:
        return "content_filter"
    return "incomplete"


class TracedBackend(BackendWrapper):
    """A backend whose model calls (``begin``/``poll``) are ``chat {model}`` CLIENT spans;
    otherwise the backend itself."""

    def __init__(
        self,
        backend: Backend,
        tracing: Tracing,
        provider: Callable[[TurnRequest], str] = lambda _request: PROVIDER_OPENAI,
        models: BoundedLabels | None = None,
    ) -> None:
        super().__init__(backend)
        self._tracer = tracing.tracer
        self._capture = tracing.capture_content
        self._provider = provider
        # The span name's model is bounded like the metrics' label (a producer chooses it).
        self._models = models if models is not None else BoundedLabels()

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        return await self._traced(self._backend.begin, request, "begin")

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        return await self._traced(self._backend.poll, request, "poll")

    async def _traced(
        self,
        call: Callable[[TurnRequest], Awaitable[ModelTurn | Pending]],
        request: TurnRequest,
        kind: str,
    ) -> ModelTurn | Pending:
        from worker.backends.base import ModelError
        from worker.runs.model import ModelTurn

        model = request.model or "unknown"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._provider(request),
            # The name asked for (cut): a span attribute, not a series or an operation name.
            "gen_ai.request.model": cap(model, MAX_MODEL_CHARS),
            "gen_ai.conversation.id": request.chat_id,
            "assistant_worker.api": self.name,
            "assistant_worker.model_call": kind,
            "assistant_worker.run_id": request.run_id,
        }
        for key, value in (
            ("gen_ai.request.temperature", request.temperature),
            ("gen_ai.request.top_p", request.top_p),
            ("gen_ai.request.max_tokens", request.max_tokens),
        ):
            if value is not None:
                attributes[key] = value
        if self._capture:
            attributes["gen_ai.input.messages"] = _cut(_input_messages(request))
        first_token: FirstToken | None = None
        if request.stream is not None:
            attributes["assistant_worker.streamed"] = True
            first_token = FirstToken(request.stream)
            request = replace(request, stream=first_token)
        with self._tracer.start_as_current_span(
            f"chat {self._models(model)}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                try:
                    result = await call(request)
                finally:
                    if first_token is not None and first_token.seconds is not None:
                        # Time to first token, from the call's start (a streamed call).
                        span.set_attribute("gen_ai.server.time_to_first_token", first_token.seconds)
            except ModelError as error:
                span.set_attribute("error.type", "transient" if error.transient else "ModelError")
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, _cut(error.message)))
                raise
            except Exception as error:
                span.set_attribute("error.type", type(error).__qualname__)
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, _cut(str(error))))
                raise
            if isinstance(result, ModelTurn):
                span.set_attribute("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", result.usage.completion_tokens)
                span.set_attribute("gen_ai.response.finish_reasons", [finish_reason(result)])
                if self._capture:
                    span.set_attribute("gen_ai.output.messages", _cut(_output_messages(result)))
            else:
                span.set_attribute("assistant_worker.pending", True)
                if result.ended is not None:
                    span.set_attribute("assistant_worker.remote_status", result.ended)
            response_id = _response_id(result.handle)
            if response_id:
                span.set_attribute("gen_ai.response.id", response_id)
            return result


class FirstToken:
    """A streamed call's ``TextStream`` that notes when the first text came."""

    def __init__(self, stream: TextStream) -> None:
        self._stream = stream
        self._started = time.monotonic()
        self.seconds: float | None = None

    @property
    def resume_after(self) -> int | None:
        return self._stream.resume_after

    async def started(self, handle: dict[str, Any], position: int) -> None:
        await self._stream.started(handle, position)

    async def text(self, text: str, position: int | None = None) -> None:
        if self.seconds is None and text:
            self.seconds = time.monotonic() - self._started
        await self._stream.text(text, position)


def _response_id(handle: Mapping[str, Any]) -> str | None:
    """The Responses API's response id, which the responses backend keeps in its handle."""
    value = handle.get("responseId")
    return value if isinstance(value, str) and value else None


def _input_messages(request: TurnRequest) -> str:
    messages = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        if message.content:
            if message.role == "tool":
                parts.append(
                    {
                        "type": "tool_call_response",
                        "id": message.tool_call_id,
                        "response": message.content,
                    }
                )
            else:
                parts.append({"type": "text", "content": message.content})
        parts.extend(
            {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}
            for call in message.tool_calls
        )
        messages.append({"role": message.role, "parts": parts})
    return json.dumps(messages, ensure_ascii=False)


def _output_messages(turn: ModelTurn) -> str:
    parts: list[dict[str, Any]] = []
    if turn.content:
        parts.append({"type": "text", "content": turn.content})
    parts.extend(
        {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}
        for call in turn.tool_calls
    )
    message = {"role": "assistant", "parts": parts, "finish_reason": finish_reason(turn)}
    return json.dumps([message], ensure_ascii=False)


def trace_backends(
    backends: dict[str, Backend],
    tracing: Tracing | None,
    provider: Callable[[TurnRequest], str] | None = None,
    models: BoundedLabels | None = None,
) -> dict[str, Backend]:
    """The backends, each wrapped in a ``TracedBackend`` when tracing is on (unchanged when
    off); ``provider`` names each request's ``gen_ai.provider.name`` (default openai);
    ``models`` bounds the model of span names (the process's one instance)."""
    if tracing is None:
        return backends
    models = models if models is not None else BoundedLabels()
    wrapped: dict[str, Backend] = {}
    for name, backend in backends.items():
        if provider is None:
            wrapped[name] = TracedBackend(backend, tracing, models=models)
        else:
            wrapped[name] = TracedBackend(backend, tracing, provider, models)
    return wrapped


# --- tool calls ---------------------------------------------------------------------------------


class TracedCall(Protocol):
    """What a tool call's span records of the call (``handlers.tool_calls.ToolCall``)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def arguments(self) -> str: ...


class TracedResult(Protocol):
    """What a tool call's span records of its result (``handlers.tool_calls.ToolResult``)."""

    @property
    def output(self) -> str: ...

    @property
    def ok(self) -> bool: ...


R = TypeVar("R", bound=TracedResult)


def tool_call_tracer(
    tracing: Tracing, known: Callable[[str], bool] = lambda _name: True
) -> Callable[[TracedCall, Awaitable[R]], Awaitable[R]]:
    """For ``ToolRegistry.set_call_tracer``: runs each call inside an ``execute_tool {name}``
    span (INTERNAL); a call whose result is a failure is an error span. The span name holds
    only a name ``known`` accepts (a registered tool); the model may call any name, and such a
    call is ``execute_tool other``, its name cut in ``gen_ai.tool.name``. A call of an MCP
    tool records its server (``mcp.server.name``)."""
    tracer = tracing.tracer
    capture = tracing.capture_content

    async def traced(call: TracedCall, running: Awaitable[R]) -> R:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": cap(call.name, MAX_MODEL_CHARS),
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
        }
        # A call of an MCP server's tool (handlers.mcp_tools.McpCall) names its server; the
        # SDK's own span for the request nests under this one, and carries its trace on.
        server = getattr(call, "server", None)
        if server:
            attributes["gen_ai.tool.type"] = "extension"
            attributes["mcp.server.name"] = server
            attributes["mcp.method.name"] = "tools/call"
        if capture:
            attributes["gen_ai.tool.call.arguments"] = _cut(call.arguments)
        name = call.name if known(call.name) else OTHER
        with tracer.start_as_current_span(
            f"execute_tool {name}", kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            result = await running
            if capture:
                span.set_attribute("gen_ai.tool.call.result", _cut(result.output))
            if not result.ok:
                span.set_attribute("error.type", "tool_error")
                span.set_status(Status(StatusCode.ERROR, _cut(result.output)))
            return result

    return traced
