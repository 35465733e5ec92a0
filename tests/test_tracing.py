"""Traces (SPEC §10): the propagation helpers, the message, model-call and tool-call spans on
their own (the SDK's in-memory exporter, on a tracer provider of the test's own: nothing is
installed globally in the test process), one weather-bot run in-process, and the set-up from
the environment in fresh interpreters (no exporter: no SDK; a trace file: JSON lines).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from handlers.tool_calls import ToolCall, run_tool_calls
from handlers.tools import ToolRegistry, tool
from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    WEATHER_ANSWER,
    ReplyQueue,
    burst,
    create_body,
    model_env,
    post_body,
    tool_registry,
)
from worker.app import open_app
from worker.backends.base import ModelError, TurnRequest
from worker.observability.logs import add_trace_ids
from worker.observability.tracing import (
    MAX_MODEL_CHARS,
    PROVIDER_AZURE,
    MessageTracing,
    TracedBackend,
    Tracing,
    TracingError,
    model_provider,
    parse_traceparent,
    run_traceparent,
    setup_tracing,
    tool_call_tracer,
)
from worker.queues.transport import Delivery
from worker.runs.history import ModelMessage
from worker.runs.model import ModelTurn, Pending, ToolCallRef, Usage
from worker.testing import FakeOpenAI

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
QUESTION = "What's the weather like right now in my favorite city?"


@dataclass
class Recorder:
    """A tracer provider of the test's own with an in-memory exporter."""

    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    provider: TracerProvider = field(default_factory=TracerProvider)

    def __post_init__(self) -> None:
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def tracing(self, capture_content: bool = False) -> Tracing:
        return Tracing.from_provider(self.provider, capture_content=capture_content)

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name.startswith(prefix)]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.provider.shutdown()


def trace_id(span: ReadableSpan) -> str:
    return f"{span.context.trace_id:032x}"


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- propagation --------------------------------------------------------------------------------


def test_traceparent_parsing_and_the_runs_trace_context(recorder: Recorder) -> None:
    """A valid traceparent is the remote parent; a malformed or absent one is none (a new
    trace, not an error). A run carries the producer's context, else the current span's,
    else none (tracing off)."""
    parsed = parse_traceparent(TRACEPARENT)
    assert parsed is not None and parsed.is_remote
    assert (f"{parsed.trace_id:032x}", f"{parsed.span_id:016x}") == (TRACE_ID, PARENT_ID)
    for bad in (None, "", "garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"00-{TRACE_ID}-xyz-01"):
        assert parse_traceparent(bad) is None, bad

    assert run_traceparent(TRACEPARENT) == TRACEPARENT
    assert run_traceparent("not a traceparent") is None
    assert run_traceparent(None) is None
    tracer = recorder.tracing().tracer
    with tracer.start_as_current_span("post") as span:
        context = span.get_span_context()
        flags = int(context.trace_flags)
        mine = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
        assert run_traceparent(None) == mine
        assert run_traceparent("00-broken") == mine
        assert run_traceparent(TRACEPARENT) == TRACEPARENT


def test_the_runs_messages_and_events_carry_its_trace_context() -> None:
    """runStep, runDeadline, toolCallsRequired and a cancelled reply carry the run's
    traceparent; a run without one sends none."""
    from datetime import UTC, datetime

    from handlers.replies import end_removed_runs, tool_calls_required
    from handlers.services import ChatRef
    from handlers.transitions import deadline_send, step_send
    from worker.config.settings import Settings
    from worker.runs.model import PendingCall, Run

    now = datetime.now(UTC)
    chat = ChatRef("c1", "AzureWebJobsStorage", "ChatState")
    traced = Run(
        run_id="run_1",
        seq=1,
        status="requires_action",
        request_id="r1",
        user_message="hi",
        api="chat",
        model="m",
        created_at=now,
        expires_at=now,
        reply_to="replies",
        pending_calls=(PendingCall("call_1", "external_tool", "{}", external=True),),
        traceparent=TRACEPARENT,
    )
    services: Any = type("Services", (), {"settings": Settings.from_env({}), "clock": lambda: now})
    for run_ in (traced, replace(traced, traceparent=None)):
        sends = [
            step_send(services, chat, run_),
            deadline_send(services, chat, run_),
            tool_calls_required(chat, run_, "replies", "none"),
        ]
        assert [send.payload.get("traceparent") for send in sends] == [run_.traceparent] * 3

    class NoRemote:
        streams = None  # nothing streams

        async def cancel_remote(self, run: Run, remote: Any) -> None:
            pass

    [reply] = asyncio.run(end_removed_runs(NoRemote(), "c1", [traced], "deleted"))  # type: ignore[arg-type]
    assert reply.payload["traceparent"] == TRACEPARENT


def delivery(body: str, queue: str = "assistant-requests", count: int = 1) -> Delivery:
    return Delivery(queue, "msg-1", "receipt", count, body)


def test_message_span_continues_the_producers_trace(recorder: Recorder) -> None:
    """One CONSUMER span per message, named after its type, with the messaging attributes,
    child of the body's traceparent; current in the context its task runs in; the outcome
    is put on it where the loop reports it; dead letters are errors. A malformed
    traceparent or an unreadable body starts a new trace."""
    tracing = MessageTracing(recorder.tracing())
    seen: list[str] = []
    observe = tracing.observing(
        lambda outcome, fields, started, error_type=None: seen.append(outcome)
    )
    post = json.dumps({"id": "c1", "userMessage": "hi", "traceparent": TRACEPARENT})

    def handle(body: str, outcome: str, error_type: str | None = None, **fields: Any) -> None:
        context, end = tracing.start(delivery(body, count=2))

        def inside() -> None:
            assert trace.get_current_span().is_recording()
            observe(outcome, {"queue": "q", "type": "assistantPost", **fields}, None, error_type)

        context.run(inside)
        end(None)

    handle(post, "completed", chat_id="c1", request_id="r1", run_id="run_1")
    handle(json.dumps({"id": "c1", "userMessage": "hi", "traceparent": "00-nope"}), "retried")
    handle("this is not JSON", "dead_lettered", "InvalidMessage")
    assert seen == ["completed", "retried", "dead_lettered"]
    assert not trace.get_current_span().is_recording(), "the caller's context is untouched"

    first, second, third = recorder.spans
    assert first.name == "process assistantPost" and first.kind is SpanKind.CONSUMER
    assert trace_id(first) == TRACE_ID
    assert first.parent is not None and f"{first.parent.span_id:016x}" == PARENT_ID
    assert attributes(first) == {
        "messaging.system": "azure_queue",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "assistant-requests",
        "messaging.message.id": "msg-1",
        "messaging.azure_queue.dequeue_count": 2,
        "assistant_worker.message.type": "assistantPost",
        "assistant_worker.outcome": "completed",
        "gen_ai.conversation.id": "c1",
        "assistant_worker.request_id": "r1",
        "assistant_worker.run_id": "run_1",
    }
    assert first.status.status_code is StatusCode.UNSET
    assert second.parent is None and trace_id(second) != TRACE_ID
    assert attributes(second)["assistant_worker.outcome"] == "retried"
    assert third.name == "process assistant-requests" and third.parent is None
    assert third.status.status_code is StatusCode.ERROR
    assert attributes(third)["error.type"] == "InvalidMessage"


# --- model calls --------------------------------------------------------------------------------


@dataclass
class ScriptedBackend:
    """A backend that answers from a list (our own protocol, not an SDK)."""

    answers: list[ModelTurn | Pending | Exception]
    name: str = "chat"

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        return self._next()

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        return self._next()

    async def cancel(self, request: TurnRequest) -> None:
        pass

    def _next(self) -> ModelTurn | Pending:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


REQUEST = TurnRequest(
    chat_id="chat-7",
    run_id="run_1",
    model="gpt-test",
    messages=(ModelMessage("system", "Be brief."), ModelMessage("user", "secret question")),
    temperature=0.5,
)


def test_model_calls_are_genai_chat_spans(recorder: Recorder) -> None:
    """``chat {model}`` CLIENT spans with the GenAI attributes: operation, provider, request
    model, conversation id, usage, finish reasons; a pending poll and the response id of a
    background response; a failed call is an error span that records the exception. No
    message content unless asked for."""
    backend = ScriptedBackend(
        [
            ModelTurn(
                content=None,
                tool_calls=(ToolCallRef("call_1", "lookup", "{}"),),
                usage=Usage(11, 7, 18),
            ),
            Pending(handle={"responseId": "resp_9"}),
            ModelTurn(
                content="secret answer",
                usage=Usage(20, 5, 25),
                incomplete="the token limit was reached",
            ),
            ModelError("slow down", transient=True),
        ]
    )
    traced = TracedBackend(backend, recorder.tracing(), model_provider(settings_with_azure()))

    async def calls() -> None:
        assert isinstance(await traced.begin(REQUEST), ModelTurn)
        assert isinstance(await traced.poll(REQUEST), Pending)
        assert isinstance(await traced.poll(REQUEST), ModelTurn)
        with pytest.raises(ModelError, match="slow down"):
            await traced.begin(REQUEST)
        await traced.cancel(REQUEST)

    asyncio.run(calls())
    assert traced.wrapped is backend and traced.name == "chat"
    tools, pending, cut, failed = recorder.spans
    assert all(s.name == "chat gpt-test" and s.kind is SpanKind.CLIENT for s in recorder.spans)
    assert attributes(tools) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_AZURE,
        "gen_ai.request.model": "gpt-test",
        "gen_ai.request.temperature": 0.5,
        "gen_ai.conversation.id": "chat-7",
        "assistant_worker.api": "chat",
        "assistant_worker.model_call": "begin",
        "assistant_worker.run_id": "run_1",
        "gen_ai.usage.input_tokens": 11,
        "gen_ai.usage.output_tokens": 7,
        "gen_ai.response.finish_reasons": ("tool_calls",),
    }
    assert attributes(pending)["assistant_worker.pending"] is True
    assert attributes(pending)["gen_ai.response.id"] == "resp_9"
    assert "gen_ai.usage.input_tokens" not in attributes(pending)
    assert attributes(cut)["gen_ai.response.finish_reasons"] == ("length",)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "slow down"
    assert attributes(failed)["error.type"] == "transient"
    assert [event.name for event in failed.events] == ["exception"]
    texts = json.dumps([attributes(s) for s in recorder.spans], default=str)
    assert "secret" not in texts


def test_a_streamed_model_call_records_its_time_to_first_token(recorder: Recorder) -> None:
    """A streamed call's span: ``assistant_worker.streamed`` and the seconds from the call's
    start to the model's first text (``gen_ai.server.time_to_first_token``); what the backend
    writes still reaches the call's stream."""

    class Collected:
        resume_after = None

        def __init__(self) -> None:
            self.texts: list[str] = []

        async def started(self, handle: dict[str, Any], position: int) -> None:
            pass

        async def text(self, text: str, position: int | None = None) -> None:
            self.texts.append(text)

    class Streaming:
        name = "chat"

        async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
            assert request.stream is not None
            await asyncio.sleep(0.05)  # the model thinks before its first token
            await request.stream.text("Hello")
            await request.stream.text(" there")
            return ModelTurn(content="Hello there", usage=Usage(3, 2, 5))

        async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
            raise AssertionError("not polled")

        async def cancel(self, request: TurnRequest) -> None:
            pass

    collected = Collected()
    traced = TracedBackend(Streaming(), recorder.tracing())
    result = asyncio.run(traced.begin(replace(REQUEST, stream=collected)))
    assert isinstance(result, ModelTurn) and collected.texts == ["Hello", " there"]
    [span] = recorder.spans
    assert attributes(span)["assistant_worker.streamed"] is True
    assert 0.05 <= float(str(attributes(span)["gen_ai.server.time_to_first_token"])) < 5


def settings_with_azure() -> Any:
    from worker.config.settings import Settings

    return Settings.from_env({"AZURE_OPENAI_ENDPOINT": "https://example.openai.azure.com"})


def test_message_contents_only_when_asked(recorder: Recorder) -> None:
    """OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true: the input and output
    messages, in the GenAI conventions' JSON; the provider is openai without Azure."""
    backend = ScriptedBackend([ModelTurn(content="secret answer", usage=Usage(3, 2, 5))])
    traced = TracedBackend(backend, recorder.tracing(capture_content=True))
    asyncio.run(traced.begin(REQUEST))
    [span] = recorder.spans
    assert attributes(span)["gen_ai.provider.name"] == "openai"
    assert json.loads(str(attributes(span)["gen_ai.input.messages"])) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "secret question"}]},
    ]
    assert json.loads(str(attributes(span)["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "secret answer"}],
            "finish_reason": "stop",
        }
    ]


# --- tool calls ---------------------------------------------------------------------------------


@tool
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@tool
def broken() -> str:
    """Always fails."""
    raise RuntimeError("broken on purpose")


@pytest.mark.parametrize("capture", [False, True])
def test_tool_calls_are_execute_tool_spans(recorder: Recorder, capture: bool) -> None:
    """Each call runs inside an ``execute_tool {name}`` INTERNAL span, child of the current
    span (sync tools in their thread too), with the tool's name and call id; a failed call
    is an error span. Arguments and results only when contents are captured."""
    registry = ToolRegistry([shout, broken])
    tracing = recorder.tracing(capture_content=capture)
    registry.set_call_tracer(tool_call_tracer(tracing))
    calls = [ToolCall("c-1", "shout", json.dumps({"text": "hi"})), ToolCall("c-2", "broken", "{}")]

    async def step() -> None:
        with tracing.tracer.start_as_current_span("process runStep"):
            results = await run_tool_calls(registry, calls, allowed=None)
        assert [r.ok for r in results] == [True, False]

    asyncio.run(step())
    spans = {span.name: span for span in recorder.spans}
    parent = spans["process runStep"]
    ok, failed = spans["execute_tool shout"], spans["execute_tool broken"]
    for span, call in ((ok, calls[0]), (failed, calls[1])):
        assert span.kind is SpanKind.INTERNAL
        assert span.parent is not None and span.parent.span_id == parent.context.span_id
        assert attributes(span)["gen_ai.operation.name"] == "execute_tool"
        assert attributes(span)["gen_ai.tool.name"] == call.name
        assert attributes(span)["gen_ai.tool.call.id"] == call.id
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert "broken on purpose" in str(failed.status.description)
    if capture:
        assert attributes(ok)["gen_ai.tool.call.arguments"] == '{"text": "hi"}'
        assert attributes(ok)["gen_ai.tool.call.result"] == "HI"
    else:
        assert "gen_ai.tool.call.arguments" not in attributes(ok)
        assert "gen_ai.tool.call.result" not in attributes(ok)

    registry.set_call_tracer(None)
    recorder.exporter.clear()
    asyncio.run(run_tool_calls(registry, calls[:1], allowed=None))
    assert recorder.spans == []


def test_tool_names_the_registry_does_not_know_are_execute_tool_other(
    recorder: Recorder,
) -> None:
    """The model may call any name (a prompt can ask it to): such a call's span is named
    ``execute_tool other`` (span names are bounded, SPEC §10), its name kept, cut, as an
    attribute; a registered tool keeps its name."""
    registry = ToolRegistry([shout])
    registry.set_call_tracer(tool_call_tracer(recorder.tracing(), known=lambda n: n in registry))
    invented = "x" * 5_000
    calls = [ToolCall("c-1", "shout", '{"text": "hi"}'), ToolCall("c-2", invented, "{}")]
    asyncio.run(run_tool_calls(registry, calls, allowed=None))
    spans = {span.name: span for span in recorder.spans}
    assert set(spans) == {"execute_tool shout", "execute_tool other"}
    name = str(attributes(spans["execute_tool other"])["gen_ai.tool.name"])
    assert name.startswith("xxxx") and len(name) <= MAX_MODEL_CHARS


def test_log_lines_carry_the_trace_id(recorder: Recorder) -> None:
    """The structlog processor adds trace_id and span_id while a span records; none when
    tracing is off."""
    assert add_trace_ids(None, "info", {"event": "x"}) == {"event": "x"}
    with recorder.tracing().tracer.start_as_current_span("process runStep") as span:
        context = span.get_span_context()
        event = add_trace_ids(None, "info", {"event": "x"})
    assert event == {
        "event": "x",
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


# --- a run, in-process --------------------------------------------------------------------------


def test_weather_run_is_one_trace(storage: StorageEnv, recorder: Recorder) -> None:
    """The weather bot with tracing on: the post's span and every step's span are in the
    producer's trace (the post's child of the producer's span, the steps of the run's
    recorded context); three ``chat`` spans under steps, three ``execute_tool`` spans; the
    run row and the reply carry the trace context."""
    chat_id = f"traced-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> dict[str, Any]:
        async with FakeOpenAI() as fake:
            settings = storage.settings(**model_env(fake.base_url))
            await storage.send(create_body(chat_id, storage.table))
            await burst(settings)  # untraced: no tracer provider in the test process
            assert recorder.spans == []
            await storage.send(
                post_body(
                    chat_id, storage.table, QUESTION, replyTo=replies.name, traceparent=TRACEPARENT
                )
            )
            async with open_app(settings, tools=tool_registry(), tracing=recorder.tracing()) as app:
                await asyncio.wait_for(app.worker.run_until_idle(), timeout=60)
            await replies.drain()
            return await storage.partition(chat_id, storage.table)

    rows = run(scenario())
    [reply] = replies.events
    assert reply["content"] == WEATHER_ANSWER
    assert reply["traceparent"] == TRACEPARENT
    [run_row] = [row for key, row in rows.items() if key.startswith("run-")]
    assert run_row["TraceParent"] == TRACEPARENT

    spans = recorder.spans
    assert {trace_id(span) for span in spans} == {TRACE_ID}, [s.name for s in spans]
    by_id = {span.context.span_id: span for span in spans}
    [post] = recorder.named("process assistantPost")
    steps = recorder.named("process runStep")
    assert len(steps) == 5, [s.name for s in spans]  # model, tools, model, tools, model
    for span in [post, *steps]:
        assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID
        assert span.parent.is_remote
        assert attributes(span)["assistant_worker.outcome"] == "completed"
        assert attributes(span)["gen_ai.conversation.id"] == chat_id
    chats = recorder.named("chat ")
    assert len(chats) == 3
    for span in chats:
        assert span.parent is not None and by_id[span.parent.span_id].name == "process runStep"
        assert attributes(span)["gen_ai.request.model"] == "weather-bot"
        assert attributes(span)["gen_ai.provider.name"] == "openai"
        assert int(str(attributes(span)["gen_ai.usage.input_tokens"])) > 0
    assert [attributes(s)["gen_ai.response.finish_reasons"] for s in chats] == [
        ("tool_calls",),
        ("tool_calls",),
        ("stop",),
    ]
    tools = sorted(str(attributes(s)["gen_ai.tool.name"]) for s in recorder.named("execute_tool "))
    assert tools == ["getCityNickname", "getUserFavoriteCity", "getWeatherAtLocation"]


# --- set-up from the environment (fresh interpreters) -------------------------------------------


def python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_exporter_installs_nothing() -> None:
    """With no exporter configured: no tracer provider (the API's no-op one), the SDK not
    even imported (the app and the CLI loaded), azure-core's tracing left off."""
    out = python(
        "import sys, json\n"
        "import worker.app, worker.cli.main\n"
        "from worker.observability.tracing import setup_tracing, current_tracing\n"
        "from opentelemetry import trace\n"
        "from azure.core.settings import settings\n"
        "print(json.dumps([setup_tracing(), current_tracing(),\n"
        "  type(trace.get_tracer_provider()).__name__,\n"
        "  any(m.startswith('opentelemetry.sdk') for m in sys.modules),\n"
        "  settings.tracing_enabled()]))\n",
        {"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"},
    )
    assert json.loads(out) == [None, None, "ProxyTracerProvider", False, False]


def test_trace_file_and_console_exporters() -> None:
    """WORKER_TRACE_FILE: one JSON line per span, with the service name; message spans and
    their children are kept, other roots (idle polls) dropped, whatever OTEL_TRACES_SAMPLER
    says, which decides for the rest; azure-core's native tracing is on.
    OTEL_TRACES_EXPORTER=console writes JSON to stdout."""
    code = (
        "import json, os\n"
        "from opentelemetry.trace import SpanKind\n"
        "from azure.core.settings import settings\n"
        "from worker.observability.tracing import setup_tracing\n"
        "tracing = setup_tracing()\n"
        "tracer = tracing.tracer\n"
        "with tracer.start_as_current_span('process runStep', kind=SpanKind.CONSUMER):\n"
        "    with tracer.start_as_current_span('GET', kind=SpanKind.CLIENT):\n"
        "        pass\n"
        "with tracer.start_as_current_span('idle poll', kind=SpanKind.CLIENT):\n"
        "    pass\n"
        "tracing.shutdown()\n"
        "print('azure', settings.tracing_enabled())\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spans.jsonl"
        out = python(code, {"WORKER_TRACE_FILE": str(path), "OTEL_SERVICE_NAME": "svc"})
        assert out.strip() == "azure True"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["name"], r["kind"]) for r in records] == [
            ("GET", "CLIENT"),
            ("process runStep", "CONSUMER"),
        ]
        assert records[0]["parent_span_id"] == records[1]["span_id"]
        assert {r["service"] for r in records} == {"svc"}

        # The configured sampler decides among message traces; other roots never start one.
        path.unlink()
        python(code, {"WORKER_TRACE_FILE": str(path), "OTEL_TRACES_SAMPLER": "always_on"})
        assert [json.loads(line)["name"] for line in path.read_text().splitlines()] == [
            "GET",
            "process runStep",
        ]
        path.unlink()
        python(code, {"WORKER_TRACE_FILE": str(path), "OTEL_TRACES_SAMPLER": "always_off"})
        assert not path.exists()

    out = python(code, {"OTEL_TRACES_EXPORTER": "console"})
    assert '"name": "process runStep"' in out and "assistant-worker" in out


class _Collector(BaseHTTPRequestHandler):
    """A loopback OTLP/HTTP receiver: keeps the bodies posted to /v1/traces."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.path == "/v1/traces":
            self.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_otlp_over_http_reaches_a_collector() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT: the spans are posted as OTLP protobuf to
    ``{endpoint}/v1/traces``, with the default service name (flushed at shutdown)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    _Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        python(
            "from opentelemetry.trace import SpanKind\n"
            "from worker.observability.tracing import setup_tracing\n"
            "tracing = setup_tracing()\n"
            "with tracing.tracer.start_as_current_span('process assistantPost', kind=SpanKind.CONSUMER):\n"
            "    pass\n"
            "tracing.shutdown()\n",
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "5",
            },
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert _Collector.bodies, "nothing was posted to /v1/traces"
    names: list[str] = []
    services: set[str] = set()
    for body in _Collector.bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names.extend(span.name for span in scope_spans.spans)
    assert names == ["process assistantPost"]
    assert services == {"assistant-worker"}


def test_configuration_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter this worker does not have, OTLP over gRPC, or Azure Monitor without its
    package: one clear error at start (before anything is installed)."""
    with pytest.raises(TracingError, match="OTEL_TRACES_EXPORTER names zipkin"):
        setup_tracing({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingError, match="http/protobuf"):
        setup_tracing(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            }
        )
    try:
        import azure.monitor.opentelemetry  # noqa: F401
    except ImportError:
        with pytest.raises(TracingError, match=r"assistant-worker\[azure-monitor\]"):
            setup_tracing({"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000"})
    assert setup_tracing({"OTEL_SDK_DISABLED": "true", "WORKER_TRACE_FILE": "/nonexistent"}) is None
    assert setup_tracing({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
