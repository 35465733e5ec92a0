"""Runs driven by real worker processes (``python -m worker run``) on Azurite, with the fake
model served over HTTP from the test process: three workers sharing one chat, and a worker
SIGKILLed in the middle of a run.

The tools are those of ``tests.support.runs`` (``WORKER_TOOLS``); they count their executions
in a file, since every worker is its own process.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import StorageEnv, run
from tests.support.processes import WorkerProcess, queue_count, send_all, wait_until
from tests.support.runs import (
    TOOL_LOG_ENV,
    ChatRows,
    ReplyQueue,
    ToolLog,
    burst,
    create_body,
    history_problems,
    model_env,
    post_body,
    runs_finished,
    tool_calls_of,
    two_notes,
)
from worker.testing import FakeOpenAI

pytestmark = pytest.mark.slow

POSTS = 30


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        yield server


def worker_env(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: Path, **extra: str
) -> dict[str, str]:
    return storage.env(
        **model_env(fake.base_url),
        WORKER_TOOLS="tests.support.runs",
        **{TOOL_LOG_ENV: str(tool_log)},
        **extra,
    )


def finished(storage: StorageEnv, chat_id: str, count: int) -> ChatRows | None:
    return asyncio.run(runs_finished(storage, chat_id, storage.table, count))


def create(storage: StorageEnv, fake: FakeOpenAI, *bodies: dict[str, Any]) -> None:
    """Create the assistants in-process before any post (a post to a missing one is
    dead-lettered)."""

    async def go() -> None:
        for body in bodies:
            await storage.send(body)
        await burst(storage.settings(**model_env(fake.base_url)))

    asyncio.run(go())


def queues_drained(storage: StorageEnv) -> bool:
    queues = [
        storage.requests_queue,
        storage.runs_queue,
        storage.requests_poison,
        f"{storage.runs_queue}-poison",
    ]
    return all(queue_count(storage, queue) == 0 for queue in queues)


def test_posts_from_three_workers_run_one_after_another(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """30 posts to one chat, consumed by three worker processes at once: 30 runs, each started
    after the previous one ended, in the order the posts were applied; every user message
    once; every tool call answered; every tool call executed once."""
    chat_id = f"busy-{storage.suffix}"
    fake.set_default(two_notes)
    create(storage, fake, create_body(chat_id, storage.table, chatModel="seq-bot"))
    tool_log = ToolLog(tmp_path / "tools.jsonl")
    env = worker_env(
        storage, fake, tool_log.path, WORKER_CONCURRENCY="8", WORKER_MAX_POLLING_INTERVAL="0.1"
    )
    texts = [f"message {n:02d}" for n in range(POSTS)]

    workers = [WorkerProcess(env, tmp_path / f"worker-{n}.log") for n in range(3)]
    try:
        for worker in workers:
            worker.wait_for_events("worker.started", 1, timeout=30)
        send_all(
            storage,
            [
                post_body(chat_id, storage.table, text, requestId=f"post-{n:02d}")
                for n, text in enumerate(texts)
            ],
        )
        rows = wait_until(
            lambda: finished(storage, chat_id, POSTS),
            timeout=90,
            what=lambda: f"{POSTS} finished runs; log tail:\n{workers[0].tail()}",
        )
        wait_until(lambda: queues_drained(storage), timeout=30, what="the queues to drain")
        handled = [len(w.events("message.completed")) for w in workers]
        logs = [event for w in workers for event in w.events()]
    finally:
        for worker in workers:
            worker.kill()

    assert all(n > 0 for n in handled), f"every worker took part: {handled}"
    assert not [e for e in logs if e.get("event") == "message.dead_lettered"]
    assert len(rows.runs) == POSTS
    assert [r["Seq"] for r in rows.runs] == list(range(1, POSTS + 1))
    assert all(r["Status"] == "completed" for r in rows.runs), [r["Status"] for r in rows.runs]
    # Seq is the order the posts were applied; runs ran in that order, never overlapping.
    for before, after in zip(rows.runs, rows.runs[1:], strict=False):
        assert after["CreatedAt"] >= before["CreatedAt"], (before["RunId"], after["RunId"])
        assert after["StartedAt"] >= before["EndedAt"], (
            f"{after['RunId']} started at {after['StartedAt']} before {before['RunId']} "
            f"ended at {before['EndedAt']}"
        )
    # The chat: the system message, then each run's messages together, in Seq order.
    messages = rows.messages
    assert rows.state["TotalMessages"] == len(messages) == 1 + 5 * POSTS
    assert rows.state["ActiveRunId"] == ""
    run_order = [m["RunId"] for m in messages[1:]]
    grouped = [run_id for n, run_id in enumerate(run_order) if n == 0 or run_order[n - 1] != run_id]
    assert grouped == [r["RunId"] for r in rows.runs], "each run's messages are contiguous"
    users = [m for m in messages if m["Role"] == "User"]
    assert [m["Content"] for m in users] == [r["UserMessage"] for r in rows.runs]
    assert sorted(m["Content"] for m in users) == texts, "every user message exactly once"
    by_request = {r["RequestId"]: r["UserMessage"] for r in rows.runs}
    assert by_request == {f"post-{n:02d}": text for n, text in enumerate(texts)}
    for run_row in rows.runs:
        mine = [m for m in messages if m.get("RunId") == run_row["RunId"]]
        assert [m["Role"] for m in mine] == ["User", "Assistant", "Tool", "Tool", "Assistant"]
        assert mine[-1]["Content"] == f"done {run_row['UserMessage']}"
    assert history_problems(messages) == []
    # Every tool call executed exactly once, across the three processes.
    labels = [f"{text}/{suffix}" for text in texts for suffix in "ab"]
    assert tool_log.count("start") == Counter({("note", label): 1 for label in labels})
    assert tool_log.count("end") == Counter({("note", label): 1 for label in labels})


def test_sigkill_mid_run_then_restart(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A worker SIGKILLed while two runs are mid-flight — one in the middle of a tool round
    (a quick tool finished, a slow one still running), one in the model call that follows its
    tool round (between two steps taken in-process) — and a second worker started: both runs
    complete, every tool call finished exactly once (a tool interrupted by the kill is started
    again), no message lost."""
    in_tools, in_model = f"kill-tools-{storage.suffix}", f"kill-model-{storage.suffix}"
    fake.script(
        "kill-tools",
        [
            {
                "tool_calls": [
                    {"name": "note", "arguments": {"label": "quick"}},
                    {"name": "slow_note", "arguments": {"label": "slow", "seconds": 10}},
                ]
            },
            {"content": "tools done"},
        ],
    )
    fake.script(
        "kill-model",
        [
            {
                "tool_calls": [
                    {"name": "note", "arguments": {"label": "k1"}},
                    {"name": "note", "arguments": {"label": "k2"}},
                ]
            },
            {"content": "model done"},
        ],
    )
    # The second model call of kill-model hangs until the worker is gone.
    fake.fault("slow", delay=60, model="kill-model", every=2, count=1)
    create(
        storage,
        fake,
        create_body(in_tools, storage.table, chatModel="kill-tools"),
        create_body(in_model, storage.table, chatModel="kill-model"),
    )
    tool_log = ToolLog(tmp_path / "tools.jsonl")
    env = worker_env(storage, fake, tool_log.path, WORKER_VISIBILITY_TIMEOUT="4")
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    def mid_flight() -> bool:
        slow_call = any(r.model == "kill-model" and r.fault == "slow" for r in fake.requests)
        return (
            slow_call
            and tool_log.has("note", "quick", "end")
            and tool_log.has("slow_note", "slow", "start")
            and not tool_log.has("slow_note", "slow", "end")
        )

    with WorkerProcess(env, tmp_path / "first.log") as first:
        first.wait_for_events("worker.started", 1, timeout=30)
        run(storage.send(post_body(in_tools, storage.table, "Go", replyTo=replies.name)))
        run(storage.send(post_body(in_model, storage.table, "Go", replyTo=replies.name)))
        wait_until(mid_flight, timeout=30, what=lambda: f"both runs mid-flight:\n{first.tail()}")
        # kill-model's tool round was taken in-process, after the model step that came with
        # its post: the kill falls between two in-process steps, and nothing but that post,
        # still leased by the dead worker, is left to continue the run.
        in_process = [e for e in first.events("step.completed") if e.get("chat_id") == in_model]
        assert [e["step"] for e in in_process] == [0, 1], first.tail()
        assert queue_count(storage, storage.runs_queue) == 0
        first.kill()
        assert first.proc.returncode == -signal.SIGKILL

    with WorkerProcess(env, tmp_path / "second.log") as second:
        tools_rows = wait_until(
            lambda: finished(storage, in_tools, 1), timeout=60, what=second.tail
        )
        model_rows = wait_until(
            lambda: finished(storage, in_model, 1), timeout=60, what=second.tail
        )
        run(replies.wait_for("assistantReply", 30, count=2))
        wait_until(lambda: queues_drained(storage), timeout=30, what="the queues to drain")

    for rows, answer in ((tools_rows, "tools done"), (model_rows, "model done")):
        [only_run] = rows.runs
        assert only_run["Status"] == "completed", only_run
        assert rows.roles == ["System", "User", "Assistant", "Tool", "Tool", "Assistant"]
        assert rows.messages[-1]["Content"] == answer
        assert rows.state["TotalMessages"] == 6
        assert history_problems(rows.messages) == []
        calls = tool_calls_of(rows.messages[2])
        assert [m["Name"] for m in rows.messages[3:5]] == [c["id"] for c in calls]
    outputs = [m["Content"] for m in tools_rows.messages[3:5]]
    assert outputs == ["noted quick", "slowly noted slow"]

    assert sorted((e["runId"], e["status"]) for e in replies.events) == sorted(
        (rows.runs[0]["RunId"], "completed") for rows in (tools_rows, model_rows)
    )
    finished_calls = tool_log.count("end")
    assert finished_calls == Counter(
        {("note", "quick"): 1, ("slow_note", "slow"): 1, ("note", "k1"): 1, ("note", "k2"): 1}
    ), "each tool call finished exactly once"
    started = tool_log.count("start")
    assert started[("slow_note", "slow")] == 2, "the call the kill interrupted ran again"
    assert started[("note", "k1")] == started[("note", "k2")] == 1, (
        "tools whose results were stored are not run again"
    )
    assert started[("note", "quick")] == 1, (
        "a tool that finished before the kill, in the same round as one that did not, "
        "is not run again"
    )


def test_a_tool_interrupted_by_a_kill_is_not_run_twice(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A tool that is not idempotent, running when its worker is SIGKILLed: the next worker
    takes the call over once its claim expired and answers it as interrupted instead of
    running it again (it may have taken effect); the run completes."""
    chat_id = f"once-{storage.suffix}"
    fake.script(
        "send-once",
        [
            {"tool_calls": [{"name": "slow_once", "arguments": {"label": "mail", "seconds": 10}}]},
            {"content": "told you"},
        ],
    )
    create(storage, fake, create_body(chat_id, storage.table, chatModel="send-once"))
    tool_log = ToolLog(tmp_path / "tools.jsonl")
    env = worker_env(storage, fake, tool_log.path, WORKER_VISIBILITY_TIMEOUT="4")
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    with WorkerProcess(env, tmp_path / "first.log") as first:
        first.wait_for_events("worker.started", 1, timeout=30)
        run(storage.send(post_body(chat_id, storage.table, "Go", replyTo=replies.name)))
        wait_until(
            lambda: tool_log.has("slow_once", "mail", "start"),
            timeout=30,
            what=lambda: f"the tool to start:\n{first.tail()}",
        )
        first.kill()
    with WorkerProcess(env, tmp_path / "second.log") as second:
        rows = wait_until(lambda: finished(storage, chat_id, 1), timeout=60, what=second.tail)
    [only_run] = rows.runs
    assert only_run["Status"] == "completed"
    tool_row = rows.messages[3]
    assert tool_row["Role"] == "Tool" and "interrupted" in tool_row["Content"]
    assert tool_log.count("start")[("slow_once", "mail")] == 1, "never run a second time"
    assert rows.messages[-1]["Content"] == "told you"
