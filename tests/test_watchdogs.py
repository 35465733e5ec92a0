"""No run outlives its deadline, and nothing raised after a commit loses what must follow it
(issue 13, items 3, 4, 5, 6, 9 and 13; SPEC §5).

Each test breaks the worker the way it breaks in production, through real worker processes on
Azurite: a storage request refused or never answered (``tests.support.http_faults``, an HTTP
proxy in front of one Azurite service that breaks the chosen request), a worker SIGKILLed at a
chosen point, SIGTERM in the middle of a run. The model is the fake OpenAI server, scripted.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    full_content,
    model_env,
    post_body,
)
from worker.testing import FakeOpenAI
from worker.testing.fake_openai_brain import Conversation, Turn

pytestmark = pytest.mark.slow

# An external tool: the run waits in requires_action for a producer that never answers, so
# only its deadline can end it.
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookupOrder",
        "description": "Look up an order; answered by the producer.",
        "parameters": {"type": "object", "properties": {"orderId": {"type": "integer"}}},
    },
}
OTHER = "OtherStorage"
RUN_TIMEOUT = 15


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        yield server


def worker_env(storage: StorageEnv, fake: FakeOpenAI, model: str, **extra: str) -> dict[str, str]:
    return storage.env(
        **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model),
        WORKER_TOOLS="tests.support.runs",
        WORKER_MAX_POLLING_INTERVAL="0.2",
        **extra,
    )


def waits_for_a_producer(fake: FakeOpenAI, model: str) -> None:
    """The model asks the first post's producer for the external tool, and answers the next
    post at once."""

    def scenario(conversation: Conversation) -> Turn:
        if conversation.last_user_text() == "where?":
            return {"tool_calls": [{"name": "lookupOrder", "arguments": {"orderId": 7}}]}
        return {"content": "second answer"}

    fake.set_default(scenario)


def create_and_wait(storage: StorageEnv, worker: WorkerProcess, body: dict[str, Any]) -> None:
    run(storage.send(body))
    worker.wait_for_events("message.completed", 1, timeout=30)


def expired_then_next_post_completes(
    storage: StorageEnv, chat_id: str, replies: ReplyQueue, table: str, **post: Any
) -> None:
    """The waiting run ends ``expired`` by its deadline, with its reply, and the chat's next
    post runs to completion."""
    [expired] = run(replies.wait_for("assistantReply", RUN_TIMEOUT + 40, requestId="first"))
    assert expired["status"] == "expired", expired
    run(
        storage.send(
            post_body(chat_id, table, "again", replyTo=replies.name, requestId="second", **post)
        )
    )
    [second] = run(replies.wait_for("assistantReply", 40, requestId="second"))
    assert second["status"] == "completed", second
    assert second["content"] == "second answer"


def test_a_deadline_send_that_failed_is_sent_again_when_the_post_is_redelivered(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The post's commit lands, its watchdog's send fails (every attempt the SDK makes): the
    post is retried, and its redelivery sends the watchdog again before the run goes on. The
    run, which then waits for a producer who never answers, expires at its deadline."""
    chat_id, model = f"lost-deadline-{storage.suffix}", f"m-{storage.suffix}"
    waits_for_a_producer(fake, model)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    queue_port = storage.azurite.queue_port
    with FaultProxy(queue_port) as proxy:
        env = worker_env(
            storage,
            fake,
            model,
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Queue", proxy.port),
            WORKER_RUN_TIMEOUT=str(RUN_TIMEOUT),
        )
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("worker.started", 1, timeout=30)
            create_and_wait(storage, worker, create_body(chat_id, storage.table, tools=[LOOKUP]))
            # Every attempt of the first send to the deadlines queue (the SDK retries 3 times).
            failed = proxy.add(
                "fail", f"/{storage.deadlines_queue}/messages", method="POST", count=4
            )
            run(
                storage.send(
                    post_body(
                        chat_id, storage.table, "where?", replyTo=replies.name, requestId="first"
                    )
                )
            )
            wait_until(lambda: failed.done, timeout=30, what="the deadline's send to fail")
            expired_then_next_post_completes(storage, chat_id, replies, storage.table)


def test_a_worker_killed_while_sending_the_watchdog_leaves_one_behind(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The worker dies after the post's commit, while the watchdog's send is on the wire (it
    never reaches the queue). The post reappears when its lease runs out; the worker that takes
    it sends the watchdog again, and the run still ends by its deadline."""
    chat_id, model = f"killed-{storage.suffix}", f"m-{storage.suffix}"
    waits_for_a_producer(fake, model)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    with FaultProxy(storage.azurite.queue_port) as proxy:
        env = worker_env(
            storage,
            fake,
            model,
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Queue", proxy.port),
            WORKER_RUN_TIMEOUT=str(RUN_TIMEOUT),
            WORKER_VISIBILITY_TIMEOUT="4",
        )
        with WorkerProcess(env, tmp_path / "first.log") as first:
            first.wait_for_events("worker.started", 1, timeout=30)
            create_and_wait(storage, first, create_body(chat_id, storage.table, tools=[LOOKUP]))
            held = proxy.add("hold", f"/{storage.deadlines_queue}/messages", method="POST")
            run(
                storage.send(
                    post_body(
                        chat_id, storage.table, "where?", replyTo=replies.name, requestId="first"
                    )
                )
            )
            wait_until(lambda: held.done, timeout=30, what="the watchdog's send to be on the wire")
            first.kill()
        proxy.release()
        with WorkerProcess(env, tmp_path / "second.log") as second:
            expired_then_next_post_completes(storage, chat_id, replies, storage.table)
            second.kill()


def test_a_commit_whose_answer_was_lost_still_sends_the_watchdog(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The post's transaction lands but its answer is lost (the connection drops): the worker
    finds its own commit, and the run still gets its step and its watchdog."""
    chat_id, model = f"lost-answer-{storage.suffix}", f"m-{storage.suffix}"
    waits_for_a_producer(fake, model)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    with FaultProxy(storage.azurite.table_port) as proxy:
        env = worker_env(
            storage,
            fake,
            model,
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Table", proxy.port),
            WORKER_RUN_TIMEOUT=str(RUN_TIMEOUT),
        )
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("worker.started", 1, timeout=30)
            create_and_wait(storage, worker, create_body(chat_id, storage.table, tools=[LOOKUP]))
            lost = proxy.add("lose_answer", r"/\$batch", method="POST")
            run(
                storage.send(
                    post_body(
                        chat_id, storage.table, "where?", replyTo=replies.name, requestId="first"
                    )
                )
            )
            wait_until(lambda: lost.done, timeout=30, what="the post's commit")
            expired_then_next_post_completes(storage, chat_id, replies, storage.table)


def test_a_watchdog_that_keeps_failing_is_sent_again_never_dead_lettered(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The chat lives on another storage account, which stops answering when the watchdog
    comes due: the watchdog fails every attempt it has. It is not dead-lettered: a fresh copy
    is sent, and once the account answers again the run expires and the chat moves on."""
    chat_id, model = f"stubborn-{storage.suffix}", f"m-{storage.suffix}"
    waits_for_a_producer(fake, model)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    with FaultProxy(storage.azurite.table_port) as proxy:
        env = worker_env(
            storage,
            fake,
            model,
            WORKER_STORAGE_SETTINGS=OTHER,
            **{OTHER: with_endpoint(storage.connection_string, "Table", proxy.port)},
            WORKER_RUN_TIMEOUT=str(RUN_TIMEOUT),
        )
        where = {"chatStorageConnectionSetting": OTHER}
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("worker.started", 1, timeout=30)
            create_and_wait(
                storage, worker, create_body(chat_id, storage.table, tools=[LOOKUP], **where)
            )
            run(
                storage.send(
                    post_body(
                        chat_id,
                        storage.table,
                        "where?",
                        replyTo=replies.name,
                        requestId="first",
                        **where,
                    )
                )
            )
            run(replies.wait_for("toolCallsRequired", 30))
            # From now on the other account refuses everything, until the watchdog was resent.
            proxy.add("fail", ".*", count=1_000_000)
            worker.wait_for_events("message.resent", 1, timeout=RUN_TIMEOUT + 90)
            proxy.clear()
            expired_then_next_post_completes(storage, chat_id, replies, storage.table, **where)
            letters = run(storage.peek_all(f"{storage.deadlines_queue}-poison"))
            assert letters == []


def test_a_step_failing_after_its_commit_landed_keeps_its_follow_ups(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The run's last step is taken in-process; its commit lands but the answer is lost, and
    the read that would tell fails too. The step cannot know what happened: the post that
    carries the run is retried, and its redelivery sends the reply the commit left unsent."""
    chat_id, model = f"after-commit-{storage.suffix}", f"m-{storage.suffix}"
    fake.script(model, [{"content": "the answer"}])
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    with FaultProxy(storage.azurite.table_port) as proxy:
        env = worker_env(
            storage,
            fake,
            model,
            WORKER_STORAGE_SETTINGS=OTHER,
            **{OTHER: with_endpoint(storage.connection_string, "Table", proxy.port)},
        )
        where = {"chatStorageConnectionSetting": OTHER}
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("worker.started", 1, timeout=30)
            create_and_wait(storage, worker, create_body(chat_id, storage.table, **where))
            # The post's commit passes; the model step's commit lands, its answer is lost, and
            # the read of the run that would tell fails (each of the SDK's 4 attempts), once.
            lost = proxy.add("lose_answer", r"/\$batch", method="POST", skip=1)
            unread = proxy.add("fail", r"RowKey='run-", method="GET", count=4, after=lost)
            run(
                storage.send(
                    post_body(
                        chat_id,
                        storage.table,
                        "hello",
                        replyTo=replies.name,
                        requestId="first",
                        **where,
                    )
                )
            )
            [reply] = run(replies.wait_for("assistantReply", 60, requestId="first"))
            assert reply["status"] == "completed"
            assert reply["content"] == "the answer"
            assert lost.done and unread.done


def test_sigterm_in_the_middle_of_a_run_hands_its_next_step_to_the_queue(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A worker told to stop during a run's model call finishes that call, then takes no new
    step: the tool round goes to the queue, another worker runs each tool once and ends the
    run, and the stopping worker exits without running any tool."""
    chat_id, model = f"drain-{storage.suffix}", f"m-{storage.suffix}"
    fake.script(
        model,
        [
            {
                "tool_calls": [
                    {"name": "slow_once", "arguments": {"label": "a", "seconds": 0.5}},
                    {"name": "slow_once", "arguments": {"label": "b", "seconds": 0.5}},
                ]
            },
            {"content": "both sent"},
        ],
    )
    fake.fault("slow", count=1, delay=3.0, model=model)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    tools = ToolLog(tmp_path / "tools.jsonl")
    env = worker_env(storage, fake, model, **{TOOL_LOG_ENV: str(tools.path)})
    with WorkerProcess(env, tmp_path / "stopping.log") as stopping:
        stopping.wait_for_events("worker.started", 1, timeout=30)
        create_and_wait(storage, stopping, create_body(chat_id, storage.table))
        run(storage.send(post_body(chat_id, storage.table, "send both", replyTo=replies.name)))
        wait_until(lambda: fake.calls(model=model) >= 1, timeout=30, what="the model call")
        stopping.signal(signal.SIGTERM)
        assert stopping.wait_exit(30) == 0
        with WorkerProcess(env, tmp_path / "other.log") as other:
            [reply] = run(replies.wait_for("assistantReply", 60))
            other.kill()
    assert reply["status"] == "completed", reply
    assert tools.count() == {("slow_once", "a"): 1, ("slow_once", "b"): 1}
    assert stopping.proc.pid not in {entry["pid"] for entry in tools.entries()}
    handed = stopping.events("step.handed_off")
    assert handed and handed[0]["run_id"] == reply["runId"]


def test_the_last_output_of_a_round_is_stored_before_the_round_is_committed(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A round of one call of a tool that must not run twice: the call runs, then the round's
    commit fails and the worker dies. The worker that continues the run finds the call's
    output stored and uses it: the call is neither run again nor answered "interrupted"."""
    chat_id, model = f"last-output-{storage.suffix}", f"m-{storage.suffix}"
    fake.script(
        model,
        [
            {"tool_calls": [{"name": "slow_once", "arguments": {"label": "x", "seconds": 1}}]},
            {"content": "sent it"},
        ],
    )
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    tools = ToolLog(tmp_path / "tools.jsonl")
    with FaultProxy(storage.azurite.table_port) as proxy:
        env = worker_env(
            storage,
            fake,
            model,
            WORKER_STORAGE_SETTINGS=OTHER,
            **{OTHER: with_endpoint(storage.connection_string, "Table", proxy.port)},
            WORKER_VISIBILITY_TIMEOUT="4",
            **{TOOL_LOG_ENV: str(tools.path)},
        )
        where = {"chatStorageConnectionSetting": OTHER}
        with WorkerProcess(env, tmp_path / "first.log") as first:
            first.wait_for_events("worker.started", 1, timeout=30)
            create_and_wait(storage, first, create_body(chat_id, storage.table, **where))
            run(
                storage.send(
                    post_body(chat_id, storage.table, "send", replyTo=replies.name, **where)
                )
            )
            wait_until(
                lambda: tools.has("slow_once", "x", "start"), timeout=30, what="the call to start"
            )
            # While the call runs: every transaction fails from now on (a write of one row,
            # the output, still passes).
            failed = proxy.add("fail", r"/\$batch", method="POST", count=1_000_000)
            wait_until(lambda: failed.fired >= 1, timeout=30, what="the round's commit to fail")
            first.kill()
        proxy.clear()
        with WorkerProcess(env, tmp_path / "second.log") as second:
            [reply] = run(replies.wait_for("assistantReply", 90))
            second.kill()
    assert reply["status"] == "completed", reply
    assert tools.count() == {("slow_once", "x"): 1}
    rows = run(chat_rows(storage, chat_id, storage.table))
    [result] = [m for m in rows.messages if m["Role"] == "Tool"]
    assert full_content(result) == "sent x"


def test_a_worker_started_during_a_queue_outage_waits_for_it_then_serves(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The queue service does not answer when the worker starts: the worker waits (not
    ready) instead of exiting, and serves once the service answers."""
    chat_id = f"late-{storage.suffix}"
    with FaultProxy(storage.azurite.queue_port) as proxy:
        down = proxy.add("reset", ".*", count=1_000_000)
        env = worker_env(
            storage,
            fake,
            "any",
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Queue", proxy.port),
        )
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("storage.unavailable", 1, timeout=60)
            wait_until(lambda: down.fired >= 8, timeout=60, what="the worker to keep probing")
            assert worker.running
            proxy.clear()
            create_and_wait(storage, worker, create_body(chat_id, storage.table))
    state = run(storage.partition(chat_id, storage.table))["state"]
    assert state["Exists"] is True


def test_steps_are_timed_one_by_one_not_as_a_whole_run(
    storage: StorageEnv, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The handler timeout bounds one step: a run of three model calls, each well within it
    but together longer, is taken in-process to its end."""
    chat_id, model = f"long-{storage.suffix}", f"m-{storage.suffix}"
    fake.script(
        model,
        [
            {"tool_calls": [{"name": "note", "arguments": {"label": "1"}}]},
            {"tool_calls": [{"name": "note", "arguments": {"label": "2"}}]},
            {"content": "done"},
        ],
    )
    fake.fault("slow", count=3, delay=1.5, model=model)
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    env = worker_env(storage, fake, model, WORKER_STEP_TIMEOUT="3")
    with WorkerProcess(env, tmp_path / "worker.log") as worker:
        worker.wait_for_events("worker.started", 1, timeout=30)
        create_and_wait(storage, worker, create_body(chat_id, storage.table))
        run(storage.send(post_body(chat_id, storage.table, "go", replyTo=replies.name)))
        [reply] = run(replies.wait_for("assistantReply", 60))
        assert reply["status"] == "completed", reply
        assert not worker.events("message.retried"), json.dumps(worker.events("message.retried"))
