"""End-to-end tests of real worker processes on real Azurite, through the real queues.

Each test starts ``python -m worker run`` as a subprocess with a JSON log, does to it what
production does (SIGKILL, SIGTERM, slow or unreachable storage, bad input) and then checks the
queues and the chat table with the Azure SDK.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.azurite import DEV_ACCOUNT_KEY, Azurite
from tests.support.env import StorageEnv
from tests.support.processes import (
    WorkerProcess,
    create_request,
    created_per_chat,
    decode_text,
    queue_count,
    read_all,
    send_all,
    table_rows,
    visible_count,
    wait_until,
)
from tests.support.tcp_proxy import TcpProxy
from worker.loop.worker import RELEASE_TIMEOUT
from worker.store.layout import request_row_key

HOST = "127.0.0.1"


def _expected_chats(storage: StorageEnv, prefix: str, count: int) -> dict[str, str]:
    """Chat id -> request id, unique to this test."""
    return {f"{prefix}-{i:03d}": f"{storage.suffix}-{prefix}-{i:03d}" for i in range(count)}


def _assert_each_chat_created_once(storage: StorageEnv, expected: dict[str, str]) -> None:
    """Every chat exists once: its state, its system message and one applied-request row."""
    rows = table_rows(storage, storage.table)
    problems: list[str] = []
    missing = sorted(set(expected) - set(rows))
    extra = sorted(set(rows) - set(expected))
    if missing:
        problems.append(f"{len(missing)} chats missing, e.g. {missing[:5]}")
    if extra:
        problems.append(f"unexpected partitions {extra[:5]}")
    for chat_id, request_id in expected.items():
        partition = rows.get(chat_id)
        if partition is None:
            continue
        wanted = {"state", "msg-0001", request_row_key(request_id)}
        if set(partition) != wanted:
            problems.append(f"{chat_id}: rows {sorted(partition)}, expected {sorted(wanted)}")
            continue
        state = partition["state"]
        if state.get("TotalMessages") != 1 or state.get("Exists") is not True:
            problems.append(f"{chat_id}: state {state}")
        if partition["msg-0001"].get("Content") != f"You are assistant {chat_id}.":
            problems.append(f"{chat_id}: system message {partition['msg-0001']}")
        if partition[request_row_key(request_id)].get("RequestId") != request_id:
            problems.append(
                f"{chat_id}: applied-request row {partition[request_row_key(request_id)]}"
            )
    assert not problems, "chat table is wrong:\n" + "\n".join(problems[:20])


def _assert_queues_empty(storage: StorageEnv) -> None:
    counts = {
        queue: queue_count(storage, queue)
        for queue in (
            storage.requests_queue,
            storage.runs_queue,
            storage.requests_poison,
            f"{storage.runs_queue}-poison",
        )
    }
    assert all(count == 0 for count in counts.values()), f"queues not empty: {counts}"
    assert read_all(storage, storage.requests_poison) == []


def _assert_no_double_create(*logs: list[dict[str, Any]]) -> None:
    """No request was applied twice: at most one ``created`` outcome per chat over all logs."""
    events = [event for log in logs for event in log]
    twice = {chat: n for chat, n in created_per_chat(events).items() if n > 1}
    assert not twice, f"chats created more than once: {twice}"


def test_sigkill_mid_batch_applies_every_create_exactly_once(
    azurite: Azurite, storage: StorageEnv, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-batch of 200 creates, then a second one: every chat once."""
    chats = 200
    expected = _expected_chats(storage, "kill", chats)
    send_all(storage, [create_request(c, r, storage.table) for c, r in expected.items()])

    # Slow table calls (50 ms per chunk each way) keep 16 creates in flight at any moment,
    # so the kill lands with messages leased, some mid-transaction and some committed but
    # not yet deleted from the queue.
    with TcpProxy(HOST, azurite.table_port) as proxy:
        proxy.set_delay(0.05)
        slow = azurite.connection_string_with(table_port=proxy.port)
        first_env = storage.env(
            AzureWebJobsStorage=slow, WORKER_CONCURRENCY="16", WORKER_VISIBILITY_TIMEOUT="3"
        )
        with WorkerProcess(first_env, tmp_path / "first.log") as first:
            first.wait_for_events("message.completed", 20, timeout=30)
            first.kill()
            assert first.proc.returncode == -signal.SIGKILL
    first_events = first.events()
    completed_first = [e for e in first_events if e.get("event") == "message.completed"]
    assert len(completed_first) < chats, "the kill came after the whole batch: not mid-batch"

    # The leases of the killed worker expire after 3 s; --burst waits for those messages too,
    # since the queue's approximate count includes invisible ones.
    second_env = storage.env(WORKER_CONCURRENCY="16", WORKER_VISIBILITY_TIMEOUT="3")
    with WorkerProcess(second_env, tmp_path / "second.log", "--burst") as second:
        assert second.wait_exit(timeout=40) == 0, second.tail()
    second_events = second.events()

    _assert_each_chat_created_once(storage, expected)
    _assert_queues_empty(storage)
    # A request committed by the first worker but not yet deleted from the queue comes back
    # to the second one and is logged "duplicate" (its applied-request row is found). One
    # whose message was deleted just before the kill shows no event in the second log, and
    # may show none in the first either if the kill fell between the delete and the log
    # line. What must never happen is two "created" outcomes for one chat.
    _assert_no_double_create(first_events, second_events)
    redelivered = [
        e for e in second_events if e.get("event") == "message.completed" and e["attempt"] >= 2
    ]
    assert redelivered, "no message leased by the killed worker was delivered again"
    assert not [
        e for e in first_events + second_events if e.get("event") == "message.dead_lettered"
    ]
    logged = {
        e.get("chat_id")
        for e in first_events + second_events
        if e.get("event") == "message.completed"
    }
    # At most the in-flight messages of the killed worker can lack a completed event.
    assert len(set(expected) - logged) <= 16, sorted(set(expected) - logged)[:20]


def test_sigterm_drains_then_releases_the_rest(
    azurite: Azurite, storage: StorageEnv, tmp_path: Path
) -> None:
    """SIGTERM: exit within the grace period, finished work deleted, the rest released."""
    chats = 40
    grace = 5.0
    # Half the chats live behind a table endpoint that answers in ~1.2 s, half behind one
    # that takes over 10 s per call. At SIGTERM the worker has creates of both kinds in
    # flight: the fast ones must finish within the grace, the slow ones cannot and must be
    # abandoned and released.
    expected = _expected_chats(storage, "drain", chats)
    slow_chats = {chat for i, chat in enumerate(expected) if i % 2}
    send_all(
        storage,
        [
            create_request(c, r, storage.table, chatStorageConnectionSetting="SlowStorage")
            if c in slow_chats
            else create_request(c, r, storage.table)
            for c, r in expected.items()
        ],
    )

    with TcpProxy(HOST, azurite.table_port) as fast, TcpProxy(HOST, azurite.table_port) as slow:
        # Fast creates take long enough that the ones received after the first completions
        # are still in flight at SIGTERM, and short enough to finish within the grace.
        # (A create of a new chat is one table request.)
        fast.set_delay(1.2)
        slow.set_delay(30.0)
        env = storage.env(
            AzureWebJobsStorage=azurite.connection_string_with(table_port=fast.port),
            WORKER_STORAGE_SETTINGS="SlowStorage",
            SlowStorage=azurite.connection_string_with(table_port=slow.port),
            WORKER_CONCURRENCY="16",
            # Long leases: abandoned messages reappear quickly only if the worker releases them.
            WORKER_VISIBILITY_TIMEOUT="60",
            WORKER_SHUTDOWN_GRACE=str(grace),
        )
        with WorkerProcess(env, tmp_path / "first.log") as first:
            first.wait_for_events("message.completed", 1, timeout=30)
            signalled = time.monotonic()
            first.signal(signal.SIGTERM)
            code = first.wait_exit(timeout=grace + 5)
            took = time.monotonic() - signalled
            assert code == 0, first.tail()
        # Leaving the block cuts the slow proxy's connections: the abandoned creates' table
        # calls are dropped, never delivered late.
    first_events = first.events()
    names = [e.get("event") for e in first_events]
    assert "worker.draining" in names, first.tail()
    assert "worker.stopped" in names, first.tail()
    (draining,) = [e for e in first_events if e.get("event") == "worker.draining"]
    abandoned = [e for e in first_events if e.get("event") == "message.abandoned"]
    assert abandoned, f"nothing was abandoned (exit after {took:.1f} s); log:\n{first.tail()}"
    assert all(e.get("released") is True for e in abandoned), abandoned
    assert draining["in_flight"] > len(abandoned), "nothing finished within the grace period"
    after_signal = names[names.index("worker.draining") :]
    assert "message.completed" in after_signal, "no in-flight create completed during the grace"
    completed_first = {e["chat_id"] for e in first_events if e.get("event") == "message.completed"}
    assert not completed_first & slow_chats, "a create on the slow storage finished: too fast"

    # Both settings direct now. The 60 s leases outlast this deadline, so finishing in time
    # shows that the abandoned messages were released at once.
    second_env = storage.env(
        WORKER_STORAGE_SETTINGS="SlowStorage", SlowStorage=azurite.connection_string
    )
    with WorkerProcess(second_env, tmp_path / "second.log", "--burst") as second:
        assert second.wait_exit(timeout=30) == 0, second.tail()
    second_events = second.events()

    _assert_each_chat_created_once(storage, expected)
    _assert_queues_empty(storage)
    _assert_no_double_create(first_events, second_events)
    # Every abandoned message was a slow create, and came back (a second delivery).
    abandoned_ids = {e["message_id"] for e in abandoned}
    redelivered = {
        e["message_id"]: e
        for e in second_events
        if e.get("event") == "message.completed" and e["message_id"] in abandoned_ids
    }
    assert set(redelivered) == abandoned_ids
    assert all(e["chat_id"] in slow_chats and e["attempt"] == 2 for e in redelivered.values())


def test_sigterm_exits_cleanly_when_releases_hang(
    azurite: Azurite, storage: StorageEnv, tmp_path: Path
) -> None:
    """A queue service that stops answering at shutdown does not turn SIGTERM into a crash."""
    chats = 8
    grace = 1.0
    expected = _expected_chats(storage, "hang", chats)
    send_all(storage, [create_request(c, r, storage.table) for c, r in expected.items()])
    with TcpProxy(HOST, azurite.table_port) as tables, TcpProxy(HOST, azurite.queue_port) as queues:
        tables.set_delay(5.0)  # no create can finish within the grace
        env = storage.env(
            AzureWebJobsStorage=azurite.connection_string_with(
                queue_port=queues.port, table_port=tables.port
            ),
            WORKER_VISIBILITY_TIMEOUT="60",
            WORKER_SHUTDOWN_GRACE=str(grace),
        )
        with WorkerProcess(env, tmp_path / "worker.log") as worker:
            worker.wait_for_events("worker.started", 1, timeout=30)
            started = tables.connections_accepted
            # Every message is leased and the handlers are waiting on the table service: new
            # table connections (one per create in flight) show that the worker has the
            # messages, not merely that the queue leased them (a receive whose answer is still
            # on its way would be held up by the queue delay below).
            wait_until(
                lambda: (
                    tables.connections_accepted >= started + 2
                    and visible_count(storage, storage.requests_queue) == 0
                ),
                timeout=20,
                what="the worker to lease every message and call the table service",
            )
            queues.set_delay(30.0)  # the queue service stops answering in time
            signalled = time.monotonic()
            worker.signal(signal.SIGTERM)
            code = worker.wait_exit(timeout=grace + RELEASE_TIMEOUT + 5)
            took = time.monotonic() - signalled
            assert code == 0, f"exit code {code} after {took:.1f} s; log:\n{worker.tail()}"
    events = worker.events()
    abandoned = [e for e in events if e.get("event") == "message.abandoned"]
    assert len(abandoned) == chats, worker.tail()
    assert not any(e["released"] for e in abandoned), abandoned
    assert any(e.get("event") == "worker.stopped" for e in events), worker.tail()
    # Not released, not lost: the messages are still on the queue, leased until they expire.
    assert queue_count(storage, storage.requests_queue) == chats


def _closed_port() -> int:
    """A local port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _connection_string(account: str, key: str, port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
        f"QueueEndpoint=http://{HOST}:{port}/{account};TableEndpoint=http://{HOST}:{port}/{account};"
    )


@dataclass(frozen=True)
class LeakRun:
    """One burst worker run fed every kind of failure, with secrets in its environment."""

    storage: StorageEnv
    keys: dict[str, str]
    bodies: dict[str, str | dict[str, Any]]
    valid: dict[str, str]
    log_text: str
    letters: list[tuple[str, dict[str, Any]]]  # (raw body as read, decoded envelope)

    def leaks(self, text: str) -> list[str]:
        """Names of the secrets found in ``text``, whole or as a 16-character slice."""
        return [name for name, key in self.keys.items() if key in text or key[8:24] in text]

    def letter(self, request_id: str) -> dict[str, Any]:
        for _, letter in self.letters:
            if letter["deadLetter"].get("requestId") == request_id:
                return letter
        raise AssertionError(f"no dead letter for {request_id}: {[e for _, e in self.letters]}")


# Bodies whose failure must dead-letter them; those marked PRODUCER_SECRET carry the worker's
# own account key because a producer made a mistake.
PRODUCER_SECRET = (
    "secret-as-type",
    "connection-string-as-setting",
    "connection-string-as-table",
    "raw-account-key",
)


@pytest.fixture(scope="module")
def leak_run(azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> LeakRun:
    storage = StorageEnv.fresh(azurite)
    keys = {
        "storage": DEV_ACCOUNT_KEY,
        "openai": f"sk-test-{secrets.token_urlsafe(24)}",
        "broken": base64.b64encode(os.urandom(64)).decode(),
        "wrong": base64.b64encode(os.urandom(64)).decode(),
    }
    env = storage.env(
        AzureWebJobsStorage=azurite.connection_string,
        OPENAI_API_KEY=keys["openai"],
        WORKER_STORAGE_SETTINGS="BrokenStorage,WrongKeyStorage",
        # Nothing listens there: every call is refused.
        BrokenStorage=_connection_string("brokenaccount", keys["broken"], _closed_port()),
        # The real Azurite account with a wrong key: every call gets 403.
        WrongKeyStorage=_connection_string(azurite.account_name, keys["wrong"], azurite.table_port),
        WORKER_MAX_DEQUEUE_COUNT="2",
        # Dead letters are then Base64: a plain-text search of the queue would find nothing.
        WORKER_MESSAGE_ENCODING="base64",
    )
    table = storage.table
    bodies: dict[str, str | dict[str, Any]] = {
        "not-json": "{this is not json",
        "plain-text": "hello there",
        "base64-not-json": base64.b64encode(b"not json either").decode(),
        "json-array": "[1, 2, 3]",
        "unknown-type": {"type": "assistantBogus", "id": "x", "requestId": "unknown-type"},
        "secret-as-type": {"type": keys["openai"], "id": "x", "requestId": "secret-as-type"},
        "bad-id": create_request("a/b", "bad-id", table),
        "broken-storage": create_request(
            "broken", "broken-storage", table, chatStorageConnectionSetting="BrokenStorage"
        ),
        "wrong-key": create_request(
            "wrongkey", "wrong-key", table, chatStorageConnectionSetting="WrongKeyStorage"
        ),
        "names-openai-key": create_request(
            "sneaky", "names-openai-key", table, chatStorageConnectionSetting="OPENAI_API_KEY"
        ),
        "names-unlisted": create_request(
            "unlisted", "names-unlisted", table, chatStorageConnectionSetting="PATH"
        ),
        "connection-string-as-setting": create_request(
            "mistake1",
            "connection-string-as-setting",
            table,
            chatStorageConnectionSetting=azurite.connection_string,
        ),
        "connection-string-as-table": create_request(
            "mistake2", "connection-string-as-table", table
        )
        | {"collectionName": azurite.connection_string},
        "raw-account-key": f"AccountKey={DEV_ACCOUNT_KEY}",
    }
    valid = _expected_chats(storage, "ok", 3)
    send_all(storage, list(bodies.values()))
    send_all(storage, [create_request(c, r, table) for c, r in valid.items()])

    log_path = tmp_path_factory.mktemp("leak") / "worker.log"
    with WorkerProcess(env, log_path, "--burst") as worker:
        assert worker.wait_exit(timeout=40) == 0, worker.tail()
    raw = read_all(storage, storage.requests_poison)
    letters = [(body, json.loads(decode_text(body))) for body in raw]
    assert len(letters) == len(bodies), [letter["deadLetter"] for _, letter in letters]
    assert set(table_rows(storage, table)) == set(valid)
    assert queue_count(storage, storage.requests_queue) == 0
    return LeakRun(storage, keys, bodies, valid, worker.text(), letters)


def _is_producer_secret(letter: dict[str, Any]) -> bool:
    """Whether this dead letter's original body is one of the PRODUCER_SECRET bodies."""
    message = letter["message"]
    if isinstance(message, str):  # the raw body, which was not JSON
        return message.startswith("AccountKey=")
    return message.get("requestId") in PRODUCER_SECRET


def test_secrets_never_leak_into_logs_or_dead_letters(leak_run: LeakRun) -> None:
    """No configured key appears in the log or a dead letter, whatever fails."""
    run = leak_run
    assert not run.leaks(run.log_text), f"log leaks {run.leaks(run.log_text)}:\n{run.log_text}"
    for raw, letter in run.letters:
        # The reason and the rest of the envelope, always; the original message too, unless
        # the producer itself put a secret there (see the next test).
        checked = letter if not _is_producer_secret(letter) else letter["deadLetter"]
        found = run.leaks(json.dumps(checked))
        if not _is_producer_secret(letter):
            found += run.leaks(raw)
        assert not found, f"dead letter leaks {found}: {letter['deadLetter']}"

    # The reasons still say what went wrong, and the envelope which setting it was.
    for request_id, setting, error in (
        ("broken-storage", "BrokenStorage", "Cannot connect"),
        ("wrong-key", "WrongKeyStorage", "failed to authenticate"),
    ):
        letter = run.letter(request_id)
        info = letter["deadLetter"]
        assert info["dequeueCount"] == 2, info
        assert info["reason"].startswith("gave up after 2 attempts; last error: "), info
        assert error in info["reason"], info
        assert letter["message"]["chatStorageConnectionSetting"] == setting, letter
    for request_id, setting in (("names-openai-key", "OPENAI_API_KEY"), ("names-unlisted", "PATH")):
        info = run.letter(request_id)["deadLetter"]
        assert info["errorType"] == "SettingNotAllowed", info
        assert f"'{setting}' is not allowed" in info["reason"], info
    info = run.letter("connection-string-as-setting")["deadLetter"]
    assert "chatStorageConnectionSetting" in info["reason"], info
    assert "unknown message type" in run.letter("secret-as-type")["deadLetter"]["reason"]


def test_secrets_sent_by_a_producer_are_masked_in_dead_letters(leak_run: LeakRun) -> None:
    """A producer that sends the worker's own secret does not get it copied to the poison queue."""
    run = leak_run
    producer = [(raw, letter) for raw, letter in run.letters if _is_producer_secret(letter)]
    assert len(producer) == len(PRODUCER_SECRET)
    for raw, letter in producer:
        found = run.leaks(raw) + run.leaks(json.dumps(letter))
        assert not found, f"dead letter leaks {found}: {letter}"
