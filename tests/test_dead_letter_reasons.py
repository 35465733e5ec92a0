"""Every dead letter says its real cause: one case per error class, through the real queues on
Azurite, with the real worker (the create grace and the dequeue limit shortened by their
settings, as an operator would set them), and the log line of each dead letter names the
message's type, chat id and request id, even for a body that was never decoded or a message
that was never run.

All the cases share one worker run (it takes a few seconds of real retries); each test reads
its own dead letter from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from azure.storage.queue.aio import QueueClient

from tests.support.azurite import Azurite, build_connection_string
from tests.support.env import StorageEnv, run
from tests.support.http_faults import FaultProxy
from tests.support.runs import ReplyQueue, create_body, eventually, post_body, serving
from worker.loop.outcome import WAITS_FOR_CHAT

GRACE = 4
MAX_DEQUEUE = 3
WRONG_KEY = "d3Jvbmcta2V5LW5vdC10aGUtYXp1cml0ZS1vbmUtYXQtYWxsLTAxMjM0NTY3ODk="


@dataclass(frozen=True)
class Case:
    """A message that must be dead-lettered, and what its dead letter must say."""

    error_type: str
    says: tuple[str, ...]
    # What the dead letter's log line names (None: the body does not say).
    type: str | None
    chat_id: str | None
    request_id: str | None


@dataclass
class Outcome:
    """The dead letters of the run by original message id, and its log events."""

    expected: dict[str, Case]
    message_ids: dict[str, str]
    letters: dict[str, dict[str, Any]]
    logs: list[dict[str, Any]]

    def letter(self, case: str) -> dict[str, Any]:
        return self.letters[self.message_ids[case]]

    def log_line(self, case: str) -> dict[str, Any]:
        message_id = self.message_ids[case]
        [line] = [
            e
            for e in self.logs
            if e["event"] == "message.dead_lettered" and e.get("message_id") == message_id
        ]
        return line


def cases(table: str, requests_queue: str) -> dict[str, tuple[Case, dict[str, Any] | str]]:
    """Case name -> (expectation, body). Chat ids are unique to the run (``table`` is)."""

    def post(chat: str, request_id: str, **fields: Any) -> dict[str, Any]:
        return post_body(chat, table, "hello", requestId=request_id, **fields)

    known = f"known-{table}"
    return {
        "not-json": (
            Case("InvalidMessage", ("neither JSON nor Base64",), "invalid", None, None),
            "this is not a request",
        ),
        "schema": (
            Case(
                "InvalidMessage",
                ("invalid assistantPost", "userMessage"),
                "assistantPost",
                "schema-chat",
                "r-schema",
            ),
            {"type": "assistantPost", "id": "schema-chat", "requestId": "r-schema"},
        ),
        "wrong-queue": (
            Case(
                "WrongQueue",
                ("runStep messages belong on the runs queue",),
                "runStep",
                "step-chat",
                None,
            ),
            {"type": "runStep", "id": "step-chat", "runId": "run_1", "step": 1},
        ),
        "reply-to": (
            Case(
                "ReplyToNotAllowed",
                ("replyTo", "worker's own queues"),
                "assistantPost",
                known,
                "r-reply-to",
            ),
            post(known, "r-reply-to", replyTo=requests_queue),
        ),
        "connection": (
            Case(
                "ConnectionNotAllowed",
                ("aiConnectionName 'elsewhere' is not allowed",),
                "assistantPost",
                known,
                "r-connection",
            ),
            post(known, "r-connection", aiConnectionName="elsewhere"),
        ),
        "setting": (
            Case(
                "SettingNotAllowed",
                ("'OtherStorage' is not allowed",),
                "assistantCreate",
                "setting-chat",
                "r-setting",
            ),
            create_body(
                "setting-chat",
                table,
                requestId="r-setting",
                chatStorageConnectionSetting="OtherStorage",
            ),
        ),
        "unknown-tool": (
            Case(
                "UnknownTool",
                ("unknown tool(s) 'noSuchTool'",),
                "assistantCreate",
                "tool-chat",
                "r-tool",
            ),
            create_body("tool-chat", table, requestId="r-tool", tools=["noSuchTool"]),
        ),
        "hosted-tool": (
            Case(
                "HostedToolsNotSupported",
                ("code_interpreter", "'chat' API"),
                "assistantCreate",
                "hosted-chat",
                "r-hosted",
            ),
            create_body(
                "hosted-chat", table, requestId="r-hosted", tools=[{"type": "code_interpreter"}]
            ),
        ),
        "unknown-run": (
            Case(
                "UnknownRun",
                ("has no run 'run_nope'",),
                "submitToolOutputs",
                known,
                "r-unknown-run",
            ),
            {
                "type": "submitToolOutputs",
                "id": known,
                "collectionName": table,
                "requestId": "r-unknown-run",
                "runId": "run_nope",
                "toolOutputs": [{"toolCallId": "call_1", "output": "x"}],
            },
        ),
        "unknown-chat": (
            Case(
                "UnknownAssistant",
                ("does not exist", "s for its create"),
                "assistantPost",
                f"nobody-{table}",
                "r-unknown-chat",
            ),
            post(f"nobody-{table}", "r-unknown-chat"),
        ),
        "rejected": (
            Case(
                "StorageRequestRejected",
                ("the table service refused",),
                "assistantCreate",
                "rejected-chat",
                "r-rejected",
            ),
            create_body(
                "rejected-chat",
                table,
                requestId="r-rejected",
                chatStorageConnectionSetting="RejectingStorage",
            ),
        ),
        "retries-exhausted": (
            Case(
                "StorageAccessDenied",
                (
                    f"gave up after {MAX_DEQUEUE} attempts; last error:",
                    "WrongKeyStorage",
                    "failed to authenticate",
                ),
                "assistantCreate",
                "wrong-key-chat",
                "r-wrong-key",
            ),
            create_body(
                "wrong-key-chat",
                table,
                requestId="r-wrong-key",
                chatStorageConnectionSetting="WrongKeyStorage",
            ),
        ),
    }


def crashed_cases(table: str) -> dict[str, tuple[Case, dict[str, Any]]]:
    """Messages sent already delivered MAX_DEQUEUE times (as if each delivery had crashed
    a worker), visible only once older than the grace: the crash guard stops them."""
    known = f"known-{table}"
    return {
        "crashed-create": (
            Case(
                "MaxDequeueCountExceeded",
                (f"delivered {MAX_DEQUEUE + 1} times without finishing", "crashed the worker"),
                "assistantCreate",
                "crashy-chat",
                "r-crashed-create",
            ),
            create_body("crashy-chat", table, requestId="r-crashed-create"),
        ),
        # A post whose chat exists: its deliveries were not spent waiting for it.
        "crashed-post": (
            Case(
                "MaxDequeueCountExceeded",
                (f"delivered {MAX_DEQUEUE + 1} times without finishing",),
                "assistantPost",
                known,
                "r-crashed-post",
            ),
            post_body(known, table, "again", requestId="r-crashed-post"),
        ),
        # A post whose chat never came: the crash guard does not hide the true cause.
        "crashed-unknown-chat": (
            Case(
                "UnknownAssistant",
                ("does not exist", "waited"),
                "assistantPost",
                "nobody-else",
                "r-crashed-unknown-chat",
            ),
            post_body("nobody-else", table, "anyone?", requestId="r-crashed-unknown-chat"),
        ),
    }


async def send_delivered(client: QueueClient, body: str, times: int, hidden_for: int) -> str:
    """Put ``body`` on the queue and receive it ``times`` times without deleting it (each
    receive counts a delivery), then hide it for ``hidden_for`` seconds."""
    sent = await client.send_message(body)
    for delivery in range(times):
        [message] = [m async for m in client.receive_messages(max_messages=1)]
        assert message.id == sent.id, "the queue holds only this message meanwhile"
        last = delivery == times - 1
        await client.update_message(
            message, message.pop_receipt, visibility_timeout=hidden_for if last else 0
        )
    return str(sent.id)


def wrong_key_storage(azurite: Azurite) -> str:
    """The real Azurite account with a wrong key: every call is refused (403)."""
    return build_connection_string(
        blob_port=azurite.blob_port, queue_port=azurite.queue_port, table_port=azurite.table_port
    ).replace(azurite.account_key, WRONG_KEY)


@pytest.fixture(scope="module")
def outcome(azurite: Azurite) -> Iterator[Outcome]:
    storage = StorageEnv.fresh(azurite)
    table = storage.table
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    known = f"known-{table}"
    bodies = cases(table, storage.requests_queue)
    crashed = crashed_cases(table)
    expected = {name: case for name, (case, _) in {**bodies, **crashed}.items()}
    expected["late-submit"] = Case(
        "InvalidToolOutputs",
        ("is not waiting for tool outputs (its status is failed)",),
        "submitToolOutputs",
        known,
        "r-late",
    )

    async def scenario(proxy: FaultProxy) -> Outcome:
        settings = storage.settings(
            WORKER_CREATE_GRACE=str(GRACE),
            WORKER_MAX_DEQUEUE_COUNT=str(MAX_DEQUEUE),
            WORKER_STORAGE_SETTINGS="RejectingStorage,WrongKeyStorage",
            RejectingStorage=azurite.connection_string_with(table_port=proxy.port),
            WrongKeyStorage=wrong_key_storage(azurite),
        )
        ids: dict[str, str] = {}
        async with storage.queues() as service:
            queue = service.get_queue_client(storage.requests_queue)
            await queue.create_queue()
            # The messages the crash guard stops go first, alone on the queue.
            for name, (_, request) in crashed.items():
                ids[name] = await send_delivered(
                    queue, json.dumps(request), MAX_DEQUEUE, hidden_for=GRACE + 2
                )
        # The chat the posts and submits name, and a run of it that ended (no model is
        # configured: it fails at once), for a submit that comes too late.
        await storage.send(create_body(known, table))
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            async with serving(settings):
                await storage.send(post_body(known, table, "hi", replyTo=replies.name))
                [reply] = await replies.wait_for("assistantReply", 20)
                late = {
                    "type": "submitToolOutputs",
                    "id": known,
                    "collectionName": table,
                    "requestId": "r-late",
                    "runId": reply["runId"],
                    "toolOutputs": [{"toolCallId": "call_1", "output": "x"}],
                }
                ids["late-submit"] = await storage.send(late)
                for name, (_, body) in bodies.items():
                    ids[name] = await storage.send(body)

                async def all_dead_lettered() -> dict[str, dict[str, Any]] | None:
                    letters = [
                        json.loads(b) for b in await storage.peek_all(storage.requests_poison)
                    ]
                    by_id = {letter["deadLetter"]["messageId"]: letter for letter in letters}
                    return by_id if set(ids.values()) <= set(by_id) else None

                letters = await eventually(
                    all_dead_lettered, 60, lambda: f"dead letters of {sorted(ids)}"
                )
        return Outcome(expected, ids, letters, [dict(event) for event in logs])

    with FaultProxy(azurite.table_port) as proxy:
        # Every table request through this connection is refused as malformed.
        proxy.add("fail", r".", count=1_000_000, status=400)
        yield run(scenario(proxy))


NAMES = [*cases("", ""), *crashed_cases(""), "late-submit"]


@pytest.mark.parametrize("name", NAMES)
def test_each_dead_letter_says_its_real_cause(outcome: Outcome, name: str) -> None:
    case, info = outcome.expected[name], outcome.letter(name)["deadLetter"]
    assert info["errorType"] == case.error_type, info
    for words in case.says:
        assert words in info["reason"], info
    if case.request_id is not None:
        assert info["requestId"] == case.request_id, info


@pytest.mark.parametrize("name", NAMES)
def test_each_dead_letter_log_line_names_the_message(outcome: Outcome, name: str) -> None:
    """Searching the log for a chat or a request finds its dead letters, however early the
    message failed (never decoded, never run)."""
    case, line = outcome.expected[name], outcome.log_line(name)
    assert line["log_level"] == "error"
    assert line["error_type"] == case.error_type
    assert (line.get("type"), line.get("chat_id")) == (case.type, case.chat_id), line
    if case.request_id is not None:
        assert line.get("request_id") == case.request_id, line


def test_a_post_for_a_chat_that_never_came_is_not_called_a_crash(outcome: Outcome) -> None:
    """The issue's case: retried within the grace until its deliveries outnumber the dequeue
    limit; then dead-lettered UnknownAssistant, not MaxDequeueCountExceeded."""
    info = outcome.letter("unknown-chat")["deadLetter"]
    assert info["dequeueCount"] > MAX_DEQUEUE, "the crash guard's limit was passed"
    assert info["errorType"] == "UnknownAssistant"
    assert "send an assistantCreate first" in info["reason"]


def test_only_requests_that_may_wait_for_their_chat_get_past_the_crash_guard() -> None:
    assert {"assistantPost", "submitToolOutputs"} == WAITS_FOR_CHAT
