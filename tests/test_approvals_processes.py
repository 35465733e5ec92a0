"""Approvals through real worker processes: a worker SIGKILLed between a stored approval and
the approved call (SPEC §5.5, issue 16's crash point). The table service is behind an HTTP
proxy (``tests.support.http_faults``) that holds the request marking the call started, so the
worker dies at exactly that point."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import StorageEnv, run
from tests.support.http_faults import FaultProxy, with_endpoint
from tests.support.processes import WorkerProcess, wait_until
from tests.support.runs import (
    TOOL_LOG_ENV,
    ReplyQueue,
    ToolLog,
    chat_rows,
    create_body,
    history_problems,
    model_env,
    post_body,
)
from tests.test_approvals_e2e import MODEL, decision, mail_bot, tool_rows
from worker.testing import FakeOpenAI

pytestmark = pytest.mark.slow

TOOLS = "tests.support.runs,tests.support.approval_tools"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        server.set_default(mail_bot)
        yield server


def test_a_worker_killed_after_the_approval_was_stored_runs_the_call_once(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The approval is stored, and the worker dies before the approved call starts (held on
    the request that marks it started, then SIGKILLed). The decision's message reappears; the
    next worker continues the run from the stored step: the call, which never started, runs
    once (not answered "interrupted", not run twice), and the run completes with its audit."""
    chat_id = f"killed-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    tools = ToolLog(tmp_path / "tools.jsonl")
    with FaultProxy(storage.azurite.table_port) as proxy:
        env = storage.env(
            **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=MODEL),
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Table", proxy.port),
            WORKER_TOOLS=TOOLS,
            WORKER_VISIBILITY_TIMEOUT="4",
            WORKER_MAX_POLLING_INTERVAL="0.2",
            **{TOOL_LOG_ENV: str(tools.path)},
        )
        with WorkerProcess(env, tmp_path / "first.log") as first:
            first.wait_for_events("worker.started", 1, timeout=30)
            run(storage.send(create_body(chat_id, storage.table, approvalRequired=["send_email"])))
            first.wait_for_events("message.completed", 1, timeout=30)
            post = post_body(chat_id, storage.table, "ship it", replyTo=replies.name)
            run(storage.send({**post, "requestId": "ask"}))
            [asked] = run(replies.wait_for("toolApprovalRequired", 30))
            [call] = asked["toolCalls"]
            starting = proxy.add("hold", r"RowKey='tool-", method="PATCH")
            approve = decision(storage, chat_id, asked["runId"], call["id"], True, by="ana")
            run(storage.send(approve))
            wait_until(lambda: starting.done, timeout=30, what="the approved call to start")
            stored = run(chat_rows(storage, chat_id, storage.table))
            first.kill()
        proxy.release()  # the held request never reached the table
        assert tools.entries() == [], "the call had not started"
        with WorkerProcess(env, tmp_path / "second.log") as second:
            [reply] = run(replies.wait_for("assistantReply", 90, requestId="ask"))
            second.kill()
    assert json.loads(stored.runs[0]["CallsDecided"]) == [[call["id"], True]]
    assert reply["status"] == "completed", reply
    assert reply["content"] == "send_email: sent to bo@example.com: ship it"
    assert tools.count("start") == {("send_email", "ship it"): 1}
    assert tools.count("end") == {("send_email", "ship it"): 1}
    rows = run(chat_rows(storage, chat_id, storage.table))
    [row] = tool_rows(rows)
    assert (row["Content"], row["Approval"], row["ApprovalBy"]) == (
        "sent to bo@example.com: ship it",
        "approved",
        "ana",
    )
    assert history_problems(rows.messages) == []


def test_an_approved_call_whose_round_commit_failed_keeps_its_output(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The approved call ran, and the commit of its round failed (the table service refused
    it): the worker stores the call's output in its claim row at once, and dies before it
    retries anything. The next worker continues the run with that output (the call is not
    answered "interrupted", nor run again)."""
    chat_id = f"kept-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    tools = ToolLog(tmp_path / "tools.jsonl")
    with FaultProxy(storage.azurite.table_port) as proxy:
        env = storage.env(
            **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=MODEL),
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Table", proxy.port),
            WORKER_TOOLS=TOOLS,
            WORKER_VISIBILITY_TIMEOUT="4",
            WORKER_MAX_POLLING_INTERVAL="0.2",
            **{TOOL_LOG_ENV: str(tools.path)},
        )
        with WorkerProcess(env, tmp_path / "first.log") as first:
            first.wait_for_events("worker.started", 1, timeout=30)
            run(storage.send(create_body(chat_id, storage.table, approvalRequired=["send_email"])))
            first.wait_for_events("message.completed", 1, timeout=30)
            post = post_body(chat_id, storage.table, "keep it", replyTo=replies.name)
            run(storage.send({**post, "requestId": "ask"}))
            [asked] = run(replies.wait_for("toolApprovalRequired", 30))
            [call] = asked["toolCalls"]
            # The decisions' transaction passes; the round's is refused (every attempt the
            # SDK makes); after it, every read and transaction waits: only a write made at
            # once, before the worker retries anything, can keep the output.
            refused = proxy.add("fail", r"/\$batch", method="POST", skip=1, count=4)
            proxy.add("hold", ".*", method="GET", count=1_000_000, after=refused)
            proxy.add("hold", r"/\$batch", method="POST", count=1_000_000, after=refused)
            run(storage.send(decision(storage, chat_id, asked["runId"], call["id"], True)))
            wait_until(lambda: _output_kept(storage, chat_id), timeout=60, what="the output kept")
            first.kill()
        proxy.clear()
        assert tools.count() == {("send_email", "keep it"): 1}
        with WorkerProcess(env, tmp_path / "second.log") as second:
            [reply] = run(replies.wait_for("assistantReply", 90, requestId="ask"))
            second.kill()
    assert reply["status"] == "completed", reply
    assert reply["content"] == "send_email: sent to bo@example.com: keep it"
    assert tools.count("start") == {("send_email", "keep it"): 1}


def _output_kept(storage: StorageEnv, chat_id: str) -> bool:
    rows = run(storage.partition(chat_id, storage.table))
    return any(key.startswith("tool-") and "Output" in row for key, row in rows.items())
