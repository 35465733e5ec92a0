"""The command line says what it sees: `send post --wait` narrates a wait that would otherwise be
silent (a chat that does not exist, a queue no worker reads, a dead letter), `state` refuses a
bad id as `send` does, the flags shown are the ones that apply, a bad number gets a sentence,
and a reply queue that is gone is not made again by a late reply.

Through real queues on Azurite and real CLI processes.
"""

import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tests.support.cli import clean_env, cli
from tests.support.env import StorageEnv, run
from tests.support.runs import create_body, eventually, model_env, post_body, serving
from worker.cli.waiting import Look, Request, quiet_for, remarks
from worker.testing import FakeOpenAI

DEAD_PORT = 9  # discard: nothing answers there


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        yield server


def test_wait_says_the_chat_does_not_exist_and_ends_with_its_dead_letter(
    storage: StorageEnv,
) -> None:
    """No silent wait until the timeout: the missing chat is named at once, and the dead
    letter (with its reason) ends the command as soon as it exists."""
    chat_id = f"nobody-{storage.suffix}"

    async def scenario() -> tuple[int, str, str, float]:
        async with serving(storage.settings(WORKER_CREATE_GRACE="3")):
            started = time.monotonic()
            code, out, err = await cli(
                clean_env(**storage.env()), "send", "post", chat_id, "hi", "--wait",
                "--timeout", "90",
            )  # fmt: skip
            return code, out, err, time.monotonic() - started

    code, _, err, took = run(scenario())
    assert code == 1, err
    assert f"assistant {chat_id!r} does not exist (yet) in table 'ChatState'" in err
    assert f"assistant-worker send create {chat_id}" in err
    assert "the request was dead-lettered (UnknownAssistant): " in err
    assert "send an assistantCreate first (it waited" in err
    assert "assistant-worker poison show " in err
    assert took < 45, "it ended with the dead letter, not at the timeout"


def test_wait_says_when_no_worker_reads_the_queue(storage: StorageEnv) -> None:
    code, _, err = run(
        cli(clean_env(**storage.env()), "send", "post", "chat-1", "hi", "--wait", "--timeout", "9")
    )
    assert code == 1
    assert f"the request is still on '{storage.requests_queue}' after" in err
    assert "no worker has received it" in err
    assert err.count("no worker has received it") == 1, "said once"
    assert "no reply within 9 s" in err


def test_wait_that_hits_a_storage_error_says_so_in_one_line() -> None:
    """Storage that does not answer: one line, no traceback, no unclosed client session."""
    unreachable = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        f"QueueEndpoint=http://127.0.0.1:{DEAD_PORT}/devstoreaccount1;"
        f"TableEndpoint=http://127.0.0.1:{DEAD_PORT}/devstoreaccount1;"
    )
    code, _, err = run(
        cli(clean_env(AzureWebJobsStorage=unreachable), "send", "post", "c", "hi", "--wait")
    )
    assert code == 1
    assert err.startswith("assistant-worker: storage error: "), err
    assert "Unclosed" not in err and "Traceback" not in err, err


def test_a_reply_to_a_queue_that_is_gone_is_dropped_not_recreated(
    storage: StorageEnv, fake: FakeOpenAI
) -> None:
    """A `send post --wait` deletes its temporary reply queue when it ends; a replay of the
    post later runs, and its reply is dropped with a log line: the worker does not make a
    queue again from a name in a message."""
    chat_id = f"replayed-{storage.suffix}"
    gone = f"reply-gone-{storage.suffix}"
    settings = storage.settings(**model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="echo"))

    async def scenario() -> tuple[list[Any], bool]:
        with structlog.testing.capture_logs() as logs:
            async with serving(settings) as app:
                await storage.send(create_body(chat_id, storage.table))
                await storage.send(post_body(chat_id, storage.table, "hi", replyTo=gone))

                async def dropped() -> bool:
                    return any(e["event"] == "reply.dropped" for e in logs)

                await eventually(dropped, 30, "the reply to be dropped")
                assert app.worker.stats["dead_lettered"] == 0
        return logs, await storage.queue_exists(gone)

    logs, exists = run(scenario())
    assert exists is False
    [line] = [e for e in logs if e["event"] == "reply.dropped"]
    assert line["log_level"] == "warning"
    assert line["reply_queue"] == gone and "does not exist" in line["error"]


def test_state_refuses_a_bad_id_as_send_does(storage: StorageEnv) -> None:
    env = clean_env(**storage.env())
    code, _, err = run(cli(env, "state", "a/b"))
    sent_code, _, sent_err = run(cli(env, "send", "post", "a/b", "hi"))
    assert (code, sent_code) == (2, 2)
    assert err == sent_err
    assert "invalid request: field 'id': must not contain '/'" in err


def test_send_shows_only_the_flags_that_apply() -> None:
    code, out, _ = run(cli(clean_env(), "send", "post", "--help"))
    assert code == 0
    assert "--requests-queue" in out and "--message-encoding" in out
    assert "--runs-queue" not in out and "--deadlines-queue" not in out


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--concurrency", "zero", "WORKER_CONCURRENCY (or --concurrency) must be a whole number"),
        ("--visibility-timeout", "soon", "must be a number (of seconds), not 'soon'"),
        ("--retry-delay", "nan", "must be a finite number, not 'nan'"),
    ],
)
def test_a_bad_number_gets_a_sentence(flag: str, value: str, says: str) -> None:
    code, _, err = run(cli(clean_env(), "run", flag, value))
    assert code == 2
    assert says in err
    assert "int()" not in err and "float" not in err


def test_poison_help_names_every_poison_queue() -> None:
    code, out, _ = run(cli(clean_env(), "poison", "--help"))
    assert code == 0
    text = " ".join(out.split())
    for queue in (
        "assistant-requests-poison",
        "assistant-runs-poison",
        "assistant-deadlines-poison",
    ):
        assert queue in text


def test_each_remark_is_said_once_and_its_end_too() -> None:
    """What a wait sees, said once; when it changes (the chat comes, a worker takes the
    request), that is said too."""
    request = Request("c", "ChatState", "AzureWebJobsStorage", "m-1", "assistant-requests")
    said: set[str] = set()
    quiet = quiet_for(10)
    first = remarks(Look(chat_exists=False, unreceived=True), 2.0, said, request, quiet)
    assert [line.split(":")[0] for line in first] == [
        "assistant 'c' does not exist (yet) in table 'ChatState'"
    ]
    assert remarks(Look(chat_exists=False, unreceived=True), 14.0, said, request, quiet) == []
    later = remarks(Look(chat_exists=False, unreceived=True), 15.0, said, request, quiet)
    assert len(later) == 1 and "no worker has received it" in later[0]
    assert remarks(Look(chat_exists=False, unreceived=True), 30.0, said, request, quiet) == []
    assert remarks(Look(chat_exists=True), 31.0, said, request, quiet) == [
        "assistant 'c' exists now",
        "a worker received the request",
    ]
