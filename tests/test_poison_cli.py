"""``assistant-worker poison`` on Azurite: real dead letters made by the real worker."""

import asyncio
import base64
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from structlog.testing import capture_logs

from tests.support.env import StorageEnv, run
from worker.app import open_app
from worker.cli.main import main
from worker.config.settings import Settings
from worker.deadletters.envelope import build_envelope
from worker.deadletters.reader import PoisonReader
from worker.queues.memory import MemoryBroker
from worker.queues.transport import Delivery, LeaseLost
from worker.store.layout import REQUEST_PREFIX, request_row_key

# Seconds a burst of the worker may take before the test fails instead of hanging.
BURST_TIMEOUT = 20.0


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


@pytest.fixture
def cli(
    storage: StorageEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Run ``assistant-worker ARGS`` in-process with this test's environment."""

    def invoke(*args: str, **env: str) -> Result:
        for name, value in storage.env(**env).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()  # drop what the worker printed before
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


async def _burst(settings: Settings) -> Counter[str]:
    async with open_app(settings) as app:
        await asyncio.wait_for(app.worker.run_until_idle(), timeout=BURST_TIMEOUT)
        return app.worker.stats


def burst(storage: StorageEnv, **env: str) -> Counter[str]:
    """Run the real worker until its queues are empty; returns its stats."""
    return run(_burst(storage.settings(**env))) or Counter()


def create(storage: StorageEnv, chat_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "assistantCreate", "id": chat_id, "collectionName": storage.table, **fields}


def put_envelope(storage: StorageEnv, original: str, message_id: str, **fields: Any) -> str:
    """Put a dead letter built by the worker's own ``build_envelope`` on the poison queue."""
    delivery = Delivery(storage.requests_queue, message_id, "receipt", 1, original)
    envelope = build_envelope(
        delivery,
        reason=fields.get("reason", "made by the test"),
        error_type=fields.get("error_type", "TestError"),
        request_id=None,
        now=fields.get("now", datetime.now(UTC)),
    )
    return run(storage.send(envelope, storage.requests_poison))  # type: ignore[no-any-return]


def count(storage: StorageEnv, queue: str) -> int:
    return run(storage.count(queue))  # type: ignore[no-any-return]


def rows(storage: StorageEnv, chat_id: str) -> dict[str, dict[str, Any]]:
    """The chat's rows in this test's table (none when the table was never created)."""
    try:
        return run(storage.partition(chat_id, storage.table))  # type: ignore[no-any-return]
    except ResourceNotFoundError:
        return {}


def listed(result: Result) -> dict[str, dict[str, Any]]:
    assert result.code == 0, result.err
    return {entry["messageId"]: entry for entry in json.loads(result.out)["deadLetters"]}


@pytest.fixture
def dead_letters(storage: StorageEnv) -> dict[str, str]:
    """Four requests the worker dead-letters, and one it applies; by name, their message ids."""
    bodies: dict[str, Any] = {
        "raw": "this is not JSON",
        "bogus": {"type": "bogus", "id": f"chat-bogus-{storage.suffix}"},
        "table": create(storage, f"chat-table-{storage.suffix}", collectionName="no_such-table"),
        "setting": create(
            storage, f"chat-setting-{storage.suffix}", chatStorageConnectionSetting="OtherStorage"
        ),
        "valid": create(storage, f"chat-ok-{storage.suffix}"),
    }
    ids = {name: run(storage.send(body)) for name, body in bodies.items()}
    stats = burst(storage)
    assert stats["dead_lettered"] == 4 and stats["completed"] == 1, stats
    return ids


def test_list_shows_dead_letters_with_reasons_and_filters(
    storage: StorageEnv, cli: Any, dead_letters: dict[str, str]
) -> None:
    result = cli("poison", "list")
    assert result.code == 0, result.err
    assert result.lines[0].split()[:3] == ["MESSAGE", "ID", "QUEUE"]
    assert result.lines[-1] == "4 dead letters (4 shown)"
    body = "\n".join(result.lines[1:-1])
    assert "unknown message type 'bogus'" in body
    assert "neither JSON nor Base64" in body
    assert "collectionName" in body
    assert "'OtherStorage' is not allowed" in body
    assert storage.requests_queue in body and f"chat-setting-{storage.suffix}" in body

    everything = listed(cli("poison", "list", "--json"))
    assert len(everything) == 4
    by_chat = {entry["chatId"]: entry for entry in everything.values()}
    setting = by_chat[f"chat-setting-{storage.suffix}"]
    assert setting["type"] == "assistantCreate"
    assert setting["errorType"] == "SettingNotAllowed"
    assert setting["originalMessageId"] == dead_letters["setting"]
    assert setting["queue"] == storage.requests_queue
    assert setting["poisonQueue"] == storage.requests_poison
    assert setting["dequeueCount"] == 1
    assert by_chat[None]["type"] == "invalid"

    def chats(*args: str) -> set[str | None]:
        return {
            entry["chatId"] for entry in listed(cli("poison", "list", "--json", *args)).values()
        }

    assert chats("--type", "invalid") == {None}
    assert chats("--type", "bogus") == {f"chat-bogus-{storage.suffix}"}
    assert chats("--type", "assistantCreate") == {
        f"chat-table-{storage.suffix}",
        f"chat-setting-{storage.suffix}",
    }
    assert chats("--id", f"chat-table-{storage.suffix}") == {f"chat-table-{storage.suffix}"}
    assert chats("--error", "settingnotallowed") == {f"chat-setting-{storage.suffix}"}
    assert chats("--error", "NOT ALLOWED", "--type", "bogus") == set()
    assert len(chats("--since", "10m")) == 4
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert chats("--since", future) == set()

    limited = cli("poison", "list", "--limit", "2")
    assert limited.lines[-1] == "4 dead letters (2 shown)"
    assert len(limited.lines) == 4  # header, two dead letters, summary
    filtered = cli("poison", "list", "--type", "assistantCreate", "--limit", "1")
    assert filtered.lines[-1] == "4 dead letters, 2 matching (1 shown)"

    # --queue takes a work queue or a poison queue; the runs queue has none.
    assert cli("poison", "list", "--queue", storage.requests_queue).lines[-1].startswith("4 ")
    assert cli("poison", "list", "--queue", storage.requests_poison).lines[-1].startswith("4 ")
    assert cli("poison", "list", "--queue", storage.runs_queue).lines[-1] == (
        "0 dead letters (0 shown)"
    )

    shown = cli("poison", "show", setting["messageId"])
    assert shown.code == 0, shown.err
    envelope = json.loads(shown.out)
    assert envelope["deadLetter"]["messageId"] == dead_letters["setting"]
    assert envelope["message"]["chatStorageConnectionSetting"] == "OtherStorage"
    # The original message id finds it too.
    assert json.loads(cli("poison", "show", dead_letters["setting"]).out) == envelope

    missing = cli("poison", "show", "no-such-id")
    assert missing.code == 1
    assert "no dead letter with message id 'no-such-id'" in missing.err

    # Reading leased and released: everything is still there, and visible.
    assert count(storage, storage.requests_poison) == 4
    assert len(run(storage.peek_all(storage.requests_poison))) == 4


def test_replay_dry_run_moves_nothing(
    storage: StorageEnv, cli: Any, dead_letters: dict[str, str]
) -> None:
    result = cli("poison", "replay", "--all", "--dry-run")
    assert result.code == 0, result.err
    assert result.lines[-1] == "dry run: 4 dead letter(s) would be replayed; nothing was moved"
    assert sum(line.startswith("would replay ") for line in result.lines) == 4
    assert all(storage.requests_queue in line for line in result.lines[:-1])
    assert count(storage, storage.requests_poison) == 4
    assert count(storage, storage.requests_queue) == 0
    assert len(run(storage.peek_all(storage.requests_poison))) == 4


def test_replay_refuses_without_a_selection(storage: StorageEnv, cli: Any) -> None:
    result = cli("poison", "replay")
    assert result.code == 2
    assert "nothing selected" in result.err and "--all" in result.err
    both = cli("poison", "replay", "--all", "some-id")
    assert both.code == 2 and "not both" in both.err
    assert cli("poison", "purge", "--limit", "3").code == 2


def test_a_fixed_request_is_replayed_and_applied(storage: StorageEnv, cli: Any) -> None:
    chat_id = f"chat-{storage.suffix}"
    message_id = run(
        storage.send(create(storage, chat_id, chatStorageConnectionSetting="OtherStorage"))
    )
    assert burst(storage)["dead_lettered"] == 1
    assert rows(storage, chat_id) == {}

    # The operator allows the setting, then replays what failed because of it.
    allowed = {"WORKER_STORAGE_SETTINGS": "OtherStorage", "OtherStorage": storage.connection_string}
    result = cli("poison", "replay", "--error", "SettingNotAllowed", **allowed)
    assert result.code == 0, result.err
    assert result.lines[-1] == f"replayed 1 of 1 dead letter(s) (1 to {storage.requests_queue})"
    assert "replayed 1/1" in result.err
    assert count(storage, storage.requests_poison) == 0
    (body,) = run(storage.peek_all(storage.requests_queue))
    assert json.loads(body)["requestId"] == message_id  # its identity is kept

    stats = burst(storage, **allowed)
    assert stats["completed"] == 1 and stats["dead_lettered"] == 0, stats
    chat = rows(storage, chat_id)
    assert chat["state"]["Exists"] is True
    assert request_row_key(message_id) in chat
    assert count(storage, storage.requests_poison) == 0


def test_replaying_an_applied_request_does_not_apply_it_twice(
    storage: StorageEnv, cli: Any
) -> None:
    chat_id = f"chat-{storage.suffix}"
    original = json.dumps(create(storage, chat_id))  # no requestId: the message id is its key
    message_id = run(storage.send(original))
    assert burst(storage)["completed"] == 1
    before = rows(storage, chat_id)
    assert request_row_key(message_id) in before

    # The same message also ended up dead-lettered (say, its ack was lost after the effect).
    poison_id = put_envelope(storage, original, message_id)
    result = cli("poison", "replay", poison_id)
    assert result.code == 0, result.err

    with capture_logs() as logs:
        stats = burst(storage)
    assert stats["completed"] == 1, stats
    completed = [event for event in logs if event["event"] == "message.completed"]
    assert [event["outcome"] for event in completed] == ["duplicate"]
    assert completed[0]["request_id"] == message_id
    after = rows(storage, chat_id)
    assert after["state"]["CreatedAt"] == before["state"]["CreatedAt"]
    assert [key for key in after if key.startswith(REQUEST_PREFIX)] == [request_row_key(message_id)]
    assert count(storage, storage.requests_poison) == 0


def test_replay_encoding_raw_text_and_foreign_messages(storage: StorageEnv, cli: Any) -> None:
    chat_id = f"chat-{storage.suffix}"
    with_id = put_envelope(storage, json.dumps(create(storage, chat_id)), "orig-1")
    raw = put_envelope(storage, "  not JSON {at all}", "orig-2")
    foreign = run(storage.send("moved here as is by the Functions host", storage.requests_poison))

    listing = cli("poison", "list")
    foreign_line = next(line for line in listing.lines if line.startswith(foreign))
    assert foreign_line.endswith("not a dead-letter envelope")

    # --all replays envelopes only; the foreign message is left alone.
    target = f"target-{storage.suffix}"
    result = cli("poison", "replay", "--all", "--to", target, "--message-encoding", "base64")
    assert result.code == 0, result.err
    assert result.lines[-1] == f"replayed 2 of 2 dead letter(s) (2 to {target})"
    assert {line.split()[1] for line in result.lines[:-1]} == {with_id, raw}
    bodies = run(storage.peek_all(target))
    assert "  not JSON {at all}" in bodies  # raw text unchanged
    (encoded,) = [body for body in bodies if body != "  not JSON {at all}"]
    assert json.loads(base64.b64decode(encoded)) == {
        **create(storage, chat_id),
        "requestId": "orig-1",
    }
    assert run(storage.peek_all(storage.requests_poison)) == [
        "moved here as is by the Functions host"
    ]

    # Named by id, it is replayed as it is, to the queue its poison queue belongs to.
    by_id = cli("poison", "replay", foreign)
    assert by_id.code == 0, by_id.err
    assert run(storage.peek_all(storage.requests_queue)) == [
        "moved here as is by the Functions host"
    ]
    assert count(storage, storage.requests_poison) == 0


def test_purge_needs_yes_and_list_leaves_the_queue_as_it_was(
    storage: StorageEnv, cli: Any, dead_letters: dict[str, str]
) -> None:
    first = listed(cli("poison", "list", "--json"))
    assert count(storage, storage.requests_poison) == 4
    assert listed(cli("poison", "list", "--json")) == first

    refused = cli("poison", "purge", "--type", "invalid")
    assert refused.code == 2
    assert "would delete 1 dead letter(s)" in refused.err and "--yes" in refused.err
    assert count(storage, storage.requests_poison) == 4

    dry = cli("poison", "purge", "--all", "--dry-run")
    assert dry.code == 0 and dry.lines[-1].startswith("dry run: 4 dead letter(s) would be deleted")
    assert count(storage, storage.requests_poison) == 4

    purged = cli("poison", "purge", "--type", "invalid", "--yes")
    assert purged.code == 0, purged.err
    assert purged.lines[-1] == "purged 1 of 1 dead letter(s)"
    remaining = listed(cli("poison", "list", "--json"))
    assert len(remaining) == 3 and all(entry["type"] != "invalid" for entry in remaining.values())

    everything = cli("poison", "purge", "--all", "--yes")
    assert everything.lines[-1] == "purged 3 of 3 dead letter(s)"
    assert count(storage, storage.requests_poison) == 0
    assert cli("poison", "list").lines == ["0 dead letters (0 shown)"]


def test_list_reads_past_the_32_message_peek_cap(storage: StorageEnv, cli: Any) -> None:
    async def fill() -> None:
        async with storage.queues() as service:
            client = service.get_queue_client(storage.requests_poison)
            await client.create_queue()
            delivery = Delivery(storage.requests_queue, "m", "r", 1, "{}")
            envelope = build_envelope(
                delivery, reason="r", error_type="E", request_id=None, now=datetime.now(UTC)
            )
            await asyncio.gather(*(client.send_message(json.dumps(envelope)) for _ in range(40)))

    run(fill())
    first = listed(cli("poison", "list", "--json"))
    assert len(first) == 40
    assert listed(cli("poison", "list", "--json")) == first
    assert count(storage, storage.requests_poison) == 40


def test_errors_are_one_readable_line(storage: StorageEnv, cli: Any) -> None:
    bad = cli("poison", "list", "--queue", "Not_A_Queue")
    assert bad.code == 2 and bad.err.count("\n") == 1 and "--queue 'Not_A_Queue'" in bad.err
    missing = cli("poison", "list", "--queue", f"absent-{storage.suffix}")
    assert missing.code == 1
    assert f"queue 'absent-{storage.suffix}-poison' does not exist" in missing.err


def test_replay_rate_paces_the_puts(storage: StorageEnv, cli: Any) -> None:
    for number in range(3):
        put_envelope(storage, json.dumps(create(storage, f"chat-{number}")), f"orig-{number}")
    started = time.monotonic()
    result = cli("poison", "replay", "--all", "--rate", "10")
    elapsed = time.monotonic() - started
    assert result.code == 0, result.err
    assert result.err.splitlines() == ["replayed 1/3", "replayed 2/3", "replayed 3/3"]
    assert elapsed >= 0.2  # three puts at 10/s: two intervals of 0.1 s
    assert count(storage, storage.requests_queue) == 3
    assert count(storage, storage.requests_poison) == 0


# --- the lease-keeping reader, on the in-memory broker (fake clock) -------------------------


class Clock:
    def __init__(self, step: float = 0.0) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def memory_poison(clock: Clock, messages: int) -> MemoryBroker:
    broker = MemoryBroker(clock)
    delivery = Delivery("work", "orig", "r", 1, json.dumps({"type": "assistantCreate", "id": "c"}))
    envelope = build_envelope(
        delivery, reason="r", error_type="E", request_id=None, now=datetime.now(UTC)
    )
    for _ in range(messages):
        broker.queue("work-poison").put(json.dumps(envelope), time_to_live=-1)
    return broker


def test_the_reader_pages_through_a_queue_and_gives_everything_back() -> None:
    clock = Clock()
    broker = memory_poison(clock, 70)
    queue = broker.queue("work-poison")

    async def scenario() -> None:
        reader = PoisonReader(broker, clock)
        result = await reader.read(["work-poison"], explicit=True)
        assert len(result.items) == 70 and not result.capped
        assert await queue.receive(32, 1) == []  # all leased by the reader
        assert await reader.release() == 0
        assert len(await queue.receive(32, 1)) == 32  # visible again

    run(scenario())


def test_the_reader_stops_at_its_bound_and_lists_a_message_once() -> None:
    # Every clock read moves 61 s: each lease runs out before the next page, so the same two
    # messages come back page after page. The read still ends, and lists each once.
    clock = Clock(step=61)
    broker = memory_poison(clock, 2)

    async def scenario() -> None:
        reader = PoisonReader(broker, clock)
        result = await reader.read(["work-poison"], explicit=True, max_read=10)
        assert result.capped
        assert len(result.items) == 2
        assert await reader.release() == 0

    run(scenario())


def test_the_reader_renews_a_lease_before_it_runs_out() -> None:
    clock = Clock()
    broker = memory_poison(clock, 1)
    queue = broker.queue("work-poison")

    async def scenario() -> None:
        reader = PoisonReader(broker, clock)
        (entry,) = (await reader.read(["work-poison"], explicit=True)).leased
        assert (await reader.renewed(entry)).delivery == entry.delivery  # fresh: untouched
        clock.now += 45
        renewed = await reader.renewed(entry)
        assert renewed.delivery.pop_receipt != entry.delivery.pop_receipt
        assert queue.messages[entry.item.message_id].visible_at == 45 + 60
        await reader.delete(entry)  # uses the newest receipt
        assert queue.messages == {}
        assert await reader.release() == 0

    run(scenario())


def test_a_message_taken_by_someone_else_is_not_released_or_deleted_by_the_reader() -> None:
    clock = Clock()
    broker = memory_poison(clock, 1)
    queue = broker.queue("work-poison")

    async def scenario() -> None:
        reader = PoisonReader(broker, clock)
        (entry,) = (await reader.read(["work-poison"], explicit=True)).leased
        clock.now += 61
        (other,) = await queue.receive(1, 30)  # another reader leases it now
        clock.now += 1
        with pytest.raises(LeaseLost):
            await reader.delete(entry)
        assert await reader.release() == 0
        assert queue.messages[other.message_id].pop_receipt == other.pop_receipt

    run(scenario())


def test_base64_dead_letters_are_read_and_replayed(storage: StorageEnv, cli: Any) -> None:
    chat_id = f"chat-{storage.suffix}"
    body = create(storage, chat_id, chatStorageConnectionSetting="OtherStorage")
    message_id = run(storage.send(base64.b64encode(json.dumps(body).encode()).decode()))
    assert burst(storage, WORKER_MESSAGE_ENCODING="base64")["dead_lettered"] == 1
    (stored,) = run(storage.peek_all(storage.requests_poison))
    assert not stored.startswith("{")  # the worker wrote the envelope in Base64

    (entry,) = listed(cli("poison", "list", "--json")).values()
    assert entry["chatId"] == chat_id and entry["errorType"] == "SettingNotAllowed"
    result = cli("poison", "replay", message_id, WORKER_MESSAGE_ENCODING="base64")
    assert result.code == 0, result.err
    (replayed,) = run(storage.peek_all(storage.requests_queue))
    assert json.loads(base64.b64decode(replayed)) == {**body, "requestId": message_id}
