"""Traces across queue hops (SPEC §10): one post's run shared by two worker processes, each
exporting its spans to a JSON-lines file (``WORKER_TRACE_FILE``), is one trace, the
producer's; the reply event hands that trace on.

Worker A takes the post (and perhaps the run's first steps) and is stopped right after it;
the run's tool round is slow, so worker B, started after A has exited, always has steps left
to take: both processes take part, whatever the timing.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import StorageEnv, run
from tests.support.processes import WorkerProcess
from tests.support.runs import ReplyQueue, burst, create_body, model_env, post_body
from worker.observability.tracing import parse_traceparent
from worker.testing import FakeOpenAI
from worker.testing.fake_openai_brain import Conversation, Turn

pytestmark = pytest.mark.slow

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# Long enough that worker A cannot finish the run before it is told to stop.
SLOW_SECONDS = 3
# Not a model the fake knows: it plays ``slow_round``.
MODEL = "slow-bot"


def slow_round(conversation: Conversation) -> Turn:
    """A fake-model scenario: one round of two tools (one slow), then the answer."""
    label = conversation.last_user_text()
    if not conversation.tool_results():
        return {
            "tool_calls": [
                {"name": "slow_note", "arguments": {"label": label, "seconds": SLOW_SECONDS}},
                {"name": "note", "arguments": {"label": label}},
            ]
        }
    return {"content": f"done {label}"}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        yield server


def spans_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_run_shared_by_two_processes_is_one_trace(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The post's span and every step's span, in whichever process, are children of the
    producer's span; the model calls are ``chat`` spans with the GenAI attributes, the tools
    ``execute_tool`` spans, storage calls the Azure SDK's child spans; nothing else starts a
    trace (idle polls are not sampled); log lines carry the trace id; the reply carries a
    traceparent of the producer's trace; no message content is recorded."""
    chat_id = f"trace-{storage.suffix}"
    fake.set_default(slow_round)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    run(burst_create(storage, fake, chat_id))
    files = {name: tmp_path / f"spans-{name}.jsonl" for name in ("a", "b")}

    def env(name: str) -> dict[str, str]:
        return storage.env(
            **model_env(fake.base_url),
            WORKER_TOOLS="tests.support.runs",
            WORKER_MAX_POLLING_INTERVAL="0.2",
            # Every step a runStep message, so that the second process takes the steps the
            # first one left when it stopped (in-process steps would finish the run there).
            WORKER_IN_PROCESS_STEPS="false",
            WORKER_TRACE_FILE=str(files[name]),
            OTEL_SERVICE_NAME=f"worker-{name}",
        )

    with WorkerProcess(env("a"), tmp_path / "worker-a.log") as a:
        a.wait_for_events("worker.started", 1, timeout=30)
        run(
            storage.send(
                post_body(
                    chat_id,
                    storage.table,
                    "hello",
                    replyTo=replies.name,
                    requestId="traced-post",
                    traceparent=TRACEPARENT,
                )
            )
        )
        completed = a.wait_for_events("message.completed", 1, timeout=30)
        a.signal(signal.SIGTERM)
        assert a.wait_exit(40) == 0, a.tail()
        a_log = a.events()
    [post_line] = [e for e in completed if e.get("type") == "assistantPost"]
    assert post_line["trace_id"] == TRACE_ID, post_line
    assert all(
        e.get("trace_id") == TRACE_ID for e in a_log if e.get("event") == "message.completed"
    )

    with WorkerProcess(env("b"), tmp_path / "worker-b.log") as b:
        [reply] = run(replies.wait_for("assistantReply", within=60))
        b.wait_for_events("message.completed", 1, timeout=10)
        b.signal(signal.SIGTERM)
        assert b.wait_exit(40) == 0, b.tail()

    assert reply["status"] == "completed" and reply["content"] == "done hello", reply
    context = parse_traceparent(reply["traceparent"])
    assert context is not None and f"{context.trace_id:032x}" == TRACE_ID

    spans = {name: spans_of(path) for name, path in files.items()}
    every = spans["a"] + spans["b"]
    assert {s["trace_id"] for s in every} == {TRACE_ID}, sorted({s["name"] for s in every})
    assert {s["service"] for s in spans["a"]} == {"worker-a"}
    assert {s["service"] for s in spans["b"]} == {"worker-b"}
    by_id = {s["span_id"]: s for s in every}

    messages = [s for s in every if s["kind"] == "CONSUMER"]
    names = [s["name"] for s in messages]
    assert names.count("process assistantPost") == 1
    assert any(s["name"] == "process assistantPost" for s in spans["a"]), "worker A took the post"
    assert any(s["name"] == "process runStep" for s in spans["b"]), "worker B took steps"
    assert names.count("process runStep") >= 3, names  # model, tools, model
    for span in messages:
        assert (span["parent_span_id"], span["parent_remote"]) == (PARENT_ID, True), span
        assert span["attributes"]["messaging.system"] == "azure_queue"
        assert span["attributes"]["messaging.destination.name"] in (
            storage.requests_queue,
            storage.runs_queue,
        )
        assert span["attributes"]["assistant_worker.outcome"] == "completed"
        assert span["attributes"]["gen_ai.conversation.id"] == chat_id

    chats = [s for s in every if s["name"].startswith("chat ")]
    assert [s["attributes"]["gen_ai.response.finish_reasons"] for s in chats] == [
        ["tool_calls"],
        ["stop"],
    ]
    for span in chats:
        assert span["name"] == f"chat {MODEL}" and span["kind"] == "CLIENT"
        assert by_id[span["parent_span_id"]]["name"] == "process runStep"
        attrs = span["attributes"]
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.request.model"] == MODEL
        assert attrs["gen_ai.conversation.id"] == chat_id
        assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0

    tools = [s for s in every if s["name"].startswith("execute_tool ")]
    assert sorted(s["name"] for s in tools) == ["execute_tool note", "execute_tool slow_note"]
    assert len({s["attributes"]["gen_ai.tool.call.id"] for s in tools}) == 2
    assert len({s["parent_span_id"] for s in tools}) == 1
    assert by_id[tools[0]["parent_span_id"]]["name"] == "process runStep"

    # The Azure SDK's own spans: storage calls, children of the message being handled.
    storage_spans = [s for s in every if (s["scope"] or "").startswith("azure")]
    assert storage_spans, sorted({(s["scope"], s["name"]) for s in every})
    assert all(s["parent_span_id"] in by_id for s in storage_spans)

    texts = json.dumps(every)
    assert "gen_ai.input.messages" not in texts and "gen_ai.tool.call.result" not in texts


async def burst_create(storage: StorageEnv, fake: FakeOpenAI, chat_id: str) -> None:
    """Create the assistant in-process (untraced) before any worker process starts."""
    await storage.send(create_body(chat_id, storage.table, chatModel=MODEL))
    await burst(storage.settings(**model_env(fake.base_url)))
    rows = await storage.partition(chat_id, storage.table)
    assert rows.get("state", {}).get("Exists") is True, rows
