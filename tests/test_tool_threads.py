"""Sync tools that hang never block other calls (issue 13, item 8), through the real queues:
more hung calls than the worker has tool threads, then a normal sync tool still runs, and the
worker says it is degraded on ``/readyz`` and in ``assistant_worker_tool_threads_stuck``.

The tool timeout (30 s) is shortened for the test; the hung tools are let go at the end.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from handlers.tools import MIN_TOOL_THREADS, tool
from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ChatRows,
    ReplyQueue,
    chat_rows,
    create_body,
    eventually,
    model_env,
    post_body,
    serving,
    tool_registry,
)
from tests.support.scrape import fetch, http_settings, scrape, value
from worker.testing import FakeOpenAI

# WORKER_CONCURRENCY=1: the worker has MIN_TOOL_THREADS (4) tool threads.
HUNG_CALLS = MIN_TOOL_THREADS + 2
TOOL_TIMEOUT = 1.0

_released = threading.Event()


@tool
def hang(label: str) -> str:
    """Block until the test lets go (a sync tool stuck on a dead connection)."""
    _released.wait(timeout=120)
    return f"let go {label}"


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hung tools are let go when the test ends, whatever happened."""
    import handlers.step

    monkeypatch.setattr(handlers.step, "TOOL_TIMEOUT", TOOL_TIMEOUT)
    _released.clear()
    try:
        yield _released
    finally:
        _released.set()


def test_hung_sync_tools_never_block_the_next_call(
    storage: StorageEnv, released: threading.Event
) -> None:
    """A run calls ``hang`` six times at once on a worker with four tool threads: every call
    times out. The chat's next run calls the sync tool ``note``: it runs (on the pool as it
    was, it timed out without running: its four threads were all stuck). ``/readyz`` stays
    200 and says the worker is degraded; the metric counts the stuck threads until they
    return."""
    chat_id = f"hang-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    hung = [{"name": "hang", "arguments": {"label": f"h{n}"}} for n in range(HUNG_CALLS)]

    async def scenario() -> dict[str, Any]:
        registry = tool_registry()
        registry.register(hang)
        async with FakeOpenAI() as fake:
            fake.script(
                "hang-bot",
                [
                    {"tool_calls": hung},
                    {"content": "the tools hung"},
                    {"tool_calls": [{"name": "note", "arguments": {"label": "after"}}]},
                    {"content": "noted"},
                ],
            )
            settings = http_settings(
                storage,
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="hang-bot"),
                WORKER_CONCURRENCY="1",
            )
            await storage.send(create_body(chat_id, storage.table))
            async with serving(settings, tools=registry) as app:
                # One after the other: the second run's tool call comes after the hung ones.
                for count, text in enumerate(("hang", "then note"), start=1):
                    await storage.send(
                        post_body(chat_id, storage.table, text, replyTo=replies.name)
                    )
                    await replies.wait_for("assistantReply", 30, count=count)
                readiness = await fetch(app, "/readyz")
                stuck = value(await scrape(app), "assistant_worker_tool_threads_stuck")
                released.set()

                async def none_stuck() -> bool:
                    return value(await scrape(app), "assistant_worker_tool_threads_stuck") == 0

                await eventually(none_stuck, 10, "the stuck threads to return")
                after = await fetch(app, "/readyz")
            return {
                "rows": await chat_rows(storage, chat_id, storage.table),
                "readiness": readiness,
                "stuck": stuck,
                "after": after,
            }

    result = run(scenario())
    rows: ChatRows = result["rows"]
    outputs = [m["Content"] for m in rows.messages if m["Role"] == "Tool"]
    assert (
        outputs[:HUNG_CALLS]
        == [f"error: tool 'hang' timed out after {TOOL_TIMEOUT:g} s"] * HUNG_CALLS
    )
    assert outputs[HUNG_CALLS:] == ["noted after"], outputs
    assert [r["Status"] for r in rows.runs] == ["completed", "completed"]

    readiness = result["readiness"]
    assert readiness.status == 200, readiness.text
    [reason] = readiness.json["reasons"]
    assert reason.startswith("degraded: ") and "stuck" in reason
    assert result["stuck"] >= MIN_TOOL_THREADS
    assert result["after"].status == 200 and result["after"].json["reasons"] == []


def test_a_hung_tool_does_not_keep_the_process_from_exiting() -> None:
    """A tool thread that never returns is a daemon: the process exits when its work is done
    (a thread of a ThreadPoolExecutor is joined at exit: the process would never end)."""
    program = textwrap.dedent(
        """
        import asyncio, threading
        from handlers.tool_calls import ToolCall, run_tool_calls
        from handlers.tools import ToolRegistry, tool, tool_executor

        @tool
        def forever() -> str:
            threading.Event().wait()
            return "never"

        registry = ToolRegistry([forever])
        threads = tool_executor(1)
        registry.set_executor(threads)
        [result] = asyncio.run(
            run_tool_calls(registry, [ToolCall("a", "forever", "")], allowed=None, timeout=0.2)
        )
        threads.shutdown(wait=False)
        print(result.output)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "timed out" in done.stdout
