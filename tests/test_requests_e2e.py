"""Requests end to end: through real queues on Azurite into Table Storage, by the real worker."""

import asyncio
import base64
import json
import subprocess
from datetime import datetime
from typing import Any

import pytest

from tests.support.azurite import REPO_ROOT
from tests.support.env import StorageEnv, run, wait_until
from tests.support.tcp_proxy import TcpProxy
from worker.app import open_app
from worker.cli.main import main as cli
from worker.config.settings import Settings
from worker.loop.worker import Worker

EXTENSION_CREATE = {
    "id": "",  # set per test
    "instructions": "Don't make assumptions about what values to plug into functions.",
    "chatStorageConnectionSetting": "AzureWebJobsStorage",
    "collectionName": "ChatState",
}


def b64(payload: Any) -> str:
    return base64.b64encode(json.dumps(payload).encode()).decode()


async def run_worker(settings: Settings) -> Worker:
    """Run a worker in burst mode until the queues are empty; returns it for its stats."""
    async with open_app(settings) as app:
        await asyncio.wait_for(app.worker.run_until_idle(), timeout=60)
        return app.worker


def poison_letters(storage: StorageEnv) -> list[dict[str, Any]]:
    return [json.loads(body) for body in run(storage.peek_all(storage.requests_poison))]


class TestExtensionPayloads:
    @pytest.mark.parametrize("encoding", ["plain", "base64"])
    def test_extension_create_writes_the_extension_layout(
        self, storage: StorageEnv, encoding: str
    ) -> None:
        """The extension's own create payload, plain or Base64, creates its rows exactly."""
        chat_id = f"ext-{encoding}-{storage.suffix}"
        payload = {**EXTENSION_CREATE, "id": chat_id}
        run(storage.send(b64(payload) if encoding == "base64" else json.dumps(payload)))
        worker = run(run_worker(storage.settings()))
        assert worker.stats["completed"] == 1

        rows = run(storage.partition(chat_id))
        state, first = rows["state"], rows["msg-0001"]
        assert state["Exists"] is True
        assert state["TotalMessages"] == 1
        assert state["TotalTokens"] == 0
        assert isinstance(state["CreatedAt"], datetime)
        assert isinstance(state["LastUpdatedAt"], datetime)
        assert first["Content"] == payload["instructions"]
        assert first["Role"] == "System"
        assert first["ToolCalls"] == ""
        assert isinstance(first["CreatedAt"], datetime)
        assert "Name" not in first
        # Besides the extension's rows, only the worker's own applied-request record.
        assert set(rows) - {"state", "msg-0001"} == {key for key in rows if key.startswith("req-")}

    def test_producer_in_another_language(self, storage: StorageEnv) -> None:
        """A Node producer using @azure/storage-queue (plain text) is understood."""
        chat_id = f"node-{storage.suffix}"
        body = json.dumps({**EXTENSION_CREATE, "id": chat_id, "instructions": "from node"})
        sent = subprocess.run(
            ["node", "tests/node/send_message.mjs", storage.requests_queue, body],
            cwd=REPO_ROOT,
            env={
                "AzureWebJobsStorage": storage.connection_string,
                "PATH": "/usr/bin:/usr/local/bin:/bin",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(sent.stdout)["messageId"]
        run(run_worker(storage.settings()))
        rows = run(storage.partition(chat_id))
        assert rows["msg-0001"]["Content"] == "from node"


BAD_INPUTS: list[tuple[str, str]] = [
    ("this is not json", "neither JSON nor Base64"),
    (base64.b64encode(b"\x00\x01garbage\xff").decode(), "Base64"),
    ("[1, 2, 3]", "JSON array"),
    (
        json.dumps({"type": "assistantTeleport", "id": "x"}),
        "unknown message type 'assistantTeleport'",
    ),
    (json.dumps({"instructions": "no id"}), "field 'id' is required"),
    (json.dumps({"id": "a/b"}), "field 'id': must not contain '/'"),
    (json.dumps({"id": "ok", "collectionName": "no-dashes"}), "field 'collectionName'"),
    (json.dumps({"id": "ok", "temperature": "hot"}), "field 'temperature'"),
    (
        json.dumps({"id": "ok", "chatStorageConnectionSetting": "OPENAI_API_KEY"}),
        "'OPENAI_API_KEY' is not allowed",
    ),
]


def test_bad_input_is_dead_lettered_on_first_attempt(storage: StorageEnv) -> None:
    """Each malformed request lands in the poison queue at once, saying what is wrong,
    while valid requests around them are processed."""
    for n, (body, _) in enumerate(BAD_INPUTS):
        run(storage.send({**EXTENSION_CREATE, "id": f"before-{n}"}))
        run(storage.send(body))
    run(storage.send({**EXTENSION_CREATE, "id": "after"}))

    worker = run(run_worker(storage.settings()))
    assert worker.stats["completed"] == len(BAD_INPUTS) + 1
    assert worker.stats["dead_lettered"] == len(BAD_INPUTS)
    assert worker.stats["retried"] == 0

    letters = poison_letters(storage)
    assert len(letters) == len(BAD_INPUTS)
    by_body = {}
    for letter in letters:
        stored = letter["message"]
        by_body[stored if isinstance(stored, str) else json.dumps(stored)] = letter["deadLetter"]
    for body, fragment in BAD_INPUTS:
        original: Any
        try:
            original = json.loads(body)
        except json.JSONDecodeError:
            original = body
        key = original if isinstance(original, str) else json.dumps(original)
        info = by_body[key]
        assert fragment in info["reason"], (body, info["reason"])
        assert info["dequeueCount"] == 1
        assert info["queue"] == storage.requests_queue
    assert run(storage.count(storage.requests_queue)) == 0
    for n in range(len(BAD_INPUTS)):
        assert "state" in run(storage.partition(f"before-{n}"))


class TestIdempotency:
    def test_a_redelivered_create_does_not_reset_the_chat(self, storage: StorageEnv) -> None:
        """The same create twice (same requestId) resets once; a new requestId resets again."""
        chat_id = f"idem-{storage.suffix}"
        create = {**EXTENSION_CREATE, "id": chat_id, "requestId": "create-1"}
        run(storage.send(create))
        run(run_worker(storage.settings()))
        created_at = run(storage.partition(chat_id))["state"]["CreatedAt"]
        run(add_history(storage, chat_id))

        run(storage.send(create))
        worker = run(run_worker(storage.settings()))
        rows = run(storage.partition(chat_id))
        assert "msg-0002" in rows, "the duplicate must not reset the chat"
        assert rows["state"]["CreatedAt"] == created_at
        assert worker.stats["completed"] == 1

        run(storage.send({**create, "requestId": "create-2", "instructions": "new"}))
        run(run_worker(storage.settings()))
        rows = run(storage.partition(chat_id))
        assert "msg-0002" not in rows, "a new create resets the chat"
        assert rows["msg-0001"]["Content"] == "new"

    def test_concurrent_duplicates_of_a_reset_leave_the_chat_intact(
        self, storage: StorageEnv
    ) -> None:
        """Copies of one create processed at the same time reset an existing chat once and
        never delete what the winning copy wrote."""
        chat_ids = [f"race-{n}-{storage.suffix}" for n in range(12)]
        for chat_id in chat_ids:
            run(storage.send({**EXTENSION_CREATE, "id": chat_id, "requestId": f"first-{chat_id}"}))
        run(run_worker(storage.settings()))
        for chat_id in chat_ids:
            run(add_history(storage, chat_id))
            again = {**EXTENSION_CREATE, "id": chat_id, "requestId": f"reset-{chat_id}"}
            for _ in range(3):
                run(storage.send(again))
        worker = run(run_worker(storage.settings(WORKER_CONCURRENCY="32")))
        assert worker.stats["completed"] == 3 * len(chat_ids)
        for chat_id in chat_ids:
            rows = run(storage.partition(chat_id))
            assert "state" in rows and "msg-0001" in rows, (
                f"{chat_id} lost its rows: {sorted(rows)}"
            )
            assert "msg-0002" not in rows, "the reset happened"

    def test_delete_removes_the_chat_once(self, storage: StorageEnv) -> None:
        """assistantDelete removes the chat's rows; the query then says it does not exist."""
        chat_id = f"del-{storage.suffix}"
        run(storage.send({**EXTENSION_CREATE, "id": chat_id}))
        run(run_worker(storage.settings()))
        run(add_history(storage, chat_id))
        delete = {"type": "assistantDelete", "id": chat_id, "requestId": "del-1"}
        run(storage.send(delete))
        run(storage.send(delete))
        worker = run(run_worker(storage.settings()))
        assert worker.stats["completed"] == 2
        rows = run(storage.partition(chat_id))
        assert all(key.startswith("req-") for key in rows)
        assert len(rows) == 2  # the applied records of the create and the delete


async def add_history(storage: StorageEnv, chat_id: str) -> None:
    """A second message row, as a post would add (to see whether a create resets it)."""
    async with storage.tables() as service:
        table = service.get_table_client("ChatState")
        await table.create_entity(
            {"PartitionKey": chat_id, "RowKey": "msg-0002", "Content": "hello", "Role": "User"}
        )


def test_transient_storage_failure_is_retried_until_it_recovers(storage: StorageEnv) -> None:
    """With the table service unreachable, a create is retried with backoff, stays on its
    queue meanwhile, and is applied once the service is back."""
    with TcpProxy("127.0.0.1", storage.azurite.table_port) as proxy:
        proxy.set_down(True)
        flaky = storage.azurite.connection_string_with(table_port=proxy.port)
        settings = storage.settings(
            WORKER_STORAGE_SETTINGS="FlakyStorage",
            FlakyStorage=flaky,
            WORKER_MAX_DEQUEUE_COUNT="10",
        )
        chat_id = f"flaky-{storage.suffix}"
        run(storage.send({"id": chat_id, "chatStorageConnectionSetting": "FlakyStorage"}))

        async def scenario() -> Worker:
            async with open_app(settings) as app:
                task = asyncio.create_task(app.worker.run())
                await wait_until(lambda: app.worker.stats["retried"] >= 2, 60, "two retries")
                # Not deleted before its effect is stored: still on the queue, no rows yet.
                assert await storage.count(storage.requests_queue) == 1
                assert await storage.partition(chat_id) == {}
                proxy.set_down(False)
                await wait_until(lambda: app.worker.stats["completed"] == 1, 60, "the create")
                app.worker.stop()
                await asyncio.wait_for(task, 30)
                return app.worker

        worker = run(scenario())
    assert worker.stats["dead_lettered"] == 0
    assert "state" in run(storage.partition(chat_id))
    assert run(storage.count(storage.requests_queue)) == 0


def test_transient_failure_is_dead_lettered_after_max_attempts(storage: StorageEnv) -> None:
    """When the table service never comes back, the create is dead-lettered after
    WORKER_MAX_DEQUEUE_COUNT attempts with the last error."""
    with TcpProxy("127.0.0.1", storage.azurite.table_port) as proxy:
        proxy.set_down(True)
        settings = storage.settings(
            WORKER_STORAGE_SETTINGS="FlakyStorage",
            FlakyStorage=storage.azurite.connection_string_with(table_port=proxy.port),
            WORKER_MAX_DEQUEUE_COUNT="3",
        )
        run(
            storage.send(
                {"id": "never", "chatStorageConnectionSetting": "FlakyStorage", "requestId": "r-n"}
            )
        )
        worker = run(run_worker(settings))
    assert worker.stats["retried"] == 2
    [letter] = poison_letters(storage)
    info = letter["deadLetter"]
    assert info["dequeueCount"] == 3
    assert "gave up after 3 attempts" in info["reason"]
    assert "storage setting 'FlakyStorage'" in info["reason"], "the reason names the connection"
    assert info["errorType"] == "StorageUnavailable"
    assert info["requestId"] == "r-n"
    assert letter["message"]["id"] == "never"


class TestCli:
    def test_send_and_state(
        self,
        storage: StorageEnv,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`send create` enqueues a request the worker applies; `state` prints AssistantState."""
        for key, value in storage.env().items():
            monkeypatch.setenv(key, value)
        chat_id = f"cli-{storage.suffix}"
        assert (
            cli(["send", "create", chat_id, "--instructions", "Be brief.", "--model", "gpt-x"]) == 0
        )
        sent = json.loads(capsys.readouterr().out)
        assert sent["request"]["type"] == "assistantCreate"
        run(run_worker(storage.settings()))
        capsys.readouterr()  # the worker's own log lines

        assert cli(["state", chat_id]) == 0
        state = json.loads(capsys.readouterr().out)
        assert state["id"] == chat_id
        assert state["exists"] is True
        assert state["totalMessages"] == 1
        assert state["recentMessages"][0]["content"] == "Be brief."
        assert state["recentMessages"][0]["role"] == "System"
        assert state["recentMessages"][0]["toolCalls"] == ""

        assert cli(["state", chat_id, "--since", "2999-01-01T00:00:00Z"]) == 0
        assert json.loads(capsys.readouterr().out)["recentMessages"] == []

        assert cli(["state", "nobody-here"]) == 0
        missing = json.loads(capsys.readouterr().out)
        assert missing["exists"] is False
        assert missing["totalMessages"] == 0

    def test_errors_are_one_readable_line(
        self,
        storage: StorageEnv,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Bad arguments give one line on stderr and a non-zero exit, not a traceback."""
        for key, value in storage.env().items():
            monkeypatch.setenv(key, value)
        assert cli(["send", "create", "a/b"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("assistant-worker: error: invalid request: field 'id'")
        assert "Traceback" not in err
        monkeypatch.setenv("WORKER_CONCURRENCY", "zero")
        assert cli(["state", "x"]) == 2
        assert "WORKER_CONCURRENCY" in capsys.readouterr().err
