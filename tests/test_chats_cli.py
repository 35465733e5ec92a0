"""``assistant-worker chats list|purge`` on Azurite: the retention policy of an operator.

Old chats are written straight into the table (rows of every kind the worker keeps: state,
messages, runs, applied requests, tool results), next to a chat the real worker created just
now; the CLI runs in-process with this test's environment.
"""

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError

from tests.support.env import StorageEnv, run
from tests.support.runs import burst, create_body
from worker.cli.chats import parse_duration
from worker.cli.main import main
from worker.store.retention import ChatSummary, Pacer, list_chats, purge_chat

NOW = datetime.now(UTC)


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(
    storage: StorageEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Run ``assistant-worker ARGS`` in-process with this test's environment."""

    def invoke(*args: str) -> Result:
        for name, value in storage.env().items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def chat_rows(
    chat_id: str, idle_days: float, messages: int = 3, active_run: str = ""
) -> list[dict[str, Any]]:
    """The rows of a chat last active ``idle_days`` ago: one of each kind the worker writes."""
    last = NOW - timedelta(days=idle_days)
    rows: list[dict[str, Any]] = [
        {
            "PartitionKey": chat_id,
            "RowKey": "state",
            "Exists": True,
            "CreatedAt": last - timedelta(days=1),
            "LastUpdatedAt": last,
            "TotalMessages": messages,
            "TotalTokens": 10,
            "ActiveRunId": active_run,
        },
        {"PartitionKey": chat_id, "RowKey": "run-000001_abc", "Status": "completed", "Seq": 1},
        {"PartitionKey": chat_id, "RowKey": "req-create-1", "RunId": ""},
        {"PartitionKey": chat_id, "RowKey": "tool-run-000001_abc-01-call1", "Output": "x"},
    ]
    for index in range(1, messages + 1):
        rows.append(
            {
                "PartitionKey": chat_id,
                "RowKey": f"msg-{index:04X}",
                "Content": f"message {index}",
                "Role": "User",
                "CreatedAt": last,
            }
        )
    return rows


async def seed(storage: StorageEnv, *chats: list[dict[str, Any]]) -> None:
    async with storage.tables() as service:
        with contextlib.suppress(ResourceExistsError):
            await service.create_table(storage.table)
        client = service.get_table_client(storage.table)
        for rows in chats:
            for start in range(0, len(rows), 100):
                await client.submit_transaction(
                    [("upsert", row) for row in rows[start : start + 100]]
                )


async def row_counts(storage: StorageEnv) -> dict[str, int]:
    """Rows per chat id in the test's table."""
    counts: dict[str, int] = {}
    async with storage.tables() as service:
        client = service.get_table_client(storage.table)
        async for row in client.query_entities("", select=["PartitionKey"]):
            counts[str(row["PartitionKey"])] = counts.get(str(row["PartitionKey"]), 0) + 1
    return counts


def setup_chats(storage: StorageEnv) -> dict[str, int]:
    """Four old chats (one with an active run, one of 150 messages) and one the worker just
    created; returns the row counts."""

    async def scenario() -> dict[str, int]:
        await seed(
            storage,
            chat_rows("old-a", idle_days=40),
            chat_rows("old-b", idle_days=31, messages=150),
            chat_rows("old-active", idle_days=45, active_run="run_000002_def"),
            chat_rows("recent", idle_days=2),
        )
        await storage.send(create_body("fresh", storage.table))
        await burst(storage.settings())
        return await row_counts(storage)

    return run(scenario())  # type: ignore[no-any-return]


def test_list_orders_chats_by_last_activity(storage: StorageEnv, cli: Any) -> None:
    """``chats list`` prints every chat, newest activity first, with its counts; --limit and
    --offset page through them; --json gives the fields."""
    setup_chats(storage)
    result = cli("chats", "list", "--table", storage.table, "--json")
    assert result.code == 0, result.err
    chats = json.loads(result.out)
    assert [c["id"] for c in chats] == ["fresh", "recent", "old-b", "old-a", "old-active"]
    by_id = {c["id"]: c for c in chats}
    assert by_id["old-b"]["totalMessages"] == 150
    assert by_id["old-active"]["activeRunId"] == "run_000002_def"
    assert by_id["fresh"]["totalMessages"] == 1
    assert datetime.fromisoformat(by_id["fresh"]["lastUpdatedAt"]) > NOW - timedelta(minutes=5)
    assert set(by_id["recent"]) == {
        "id",
        "createdAt",
        "lastUpdatedAt",
        "totalMessages",
        "activeRunId",
    }

    page = cli("chats", "list", "--table", storage.table, "--limit", "2", "--offset", "1")
    assert page.code == 0, page.err
    lines = page.out.splitlines()
    assert lines[0].split()[:3] == ["lastUpdatedAt", "createdAt", "messages"]
    assert [line.split()[3] for line in lines[1:]] == ["recent", "old-b"]
    assert "5 chats" in page.err and "--offset 3" in page.err

    missing = cli("chats", "list", "--table", f"Missing{storage.suffix}")
    assert missing.code == 1
    assert "does not exist" in missing.err


def test_purge_dry_run_and_confirmation_delete_nothing(storage: StorageEnv, cli: Any) -> None:
    """--dry-run lists the idle chats (not the one with an active run) and deletes nothing;
    without --yes, purge refuses."""
    before = setup_chats(storage)
    dry = cli("chats", "purge", "--table", storage.table, "--older-than", "30d", "--dry-run")
    assert dry.code == 0, dry.err
    would = [line.split()[2] for line in dry.out.splitlines() if line.startswith("would purge")]
    assert sorted(would) == ["old-a", "old-b"]
    assert "nothing was deleted" in dry.out
    assert "1 skipped with an active run" in dry.out
    assert "old-active" in dry.err
    assert run(row_counts(storage)) == before

    refused = cli("chats", "purge", "--table", storage.table, "--older-than", "30d")
    assert refused.code == 2
    assert "--yes" in refused.err
    assert run(row_counts(storage)) == before


def test_purge_removes_exactly_the_idle_chats(storage: StorageEnv, cli: Any) -> None:
    """purge --older-than 30d --yes deletes every row of each idle chat (150 messages take
    two transactions) and nothing of the others; --include-active then takes the idle chat
    whose run is still marked active; the worker's chat is still readable."""
    before = setup_chats(storage)
    assert before["old-b"] == 154

    result = cli("chats", "purge", "--table", storage.table, "--older-than", "30d", "--yes")
    assert result.code == 0, result.err
    after = run(row_counts(storage))
    assert set(after) == {"old-active", "recent", "fresh"}
    assert {k: before[k] for k in after} == after
    assert "purged 2 of 2 idle chat(s) (161 rows)" in result.out
    assert "purge 2/2" in result.err

    again = cli(
        "chats", "purge", "--table", storage.table, "--older-than", "30d", "--yes",
        "--include-active",
    )  # fmt: skip
    assert again.code == 0, again.err
    assert set(run(row_counts(storage))) == {"recent", "fresh"}

    state = cli("state", "fresh", "--collection", storage.table)
    assert state.code == 0, state.err
    assert json.loads(state.out)["exists"] is True

    none = cli("chats", "purge", "--table", storage.table, "--older-than", "1d", "--yes")
    assert none.code == 0, none.err
    assert set(run(row_counts(storage))) == {"fresh"}


def test_a_chat_that_changed_after_the_listing_is_left_alone(storage: StorageEnv) -> None:
    """A chat whose state row changed after it was listed (a new post) is not purged."""

    async def scenario() -> None:
        await seed(storage, chat_rows("busy", idle_days=40))
        async with storage.tables() as service:
            client = service.get_table_client(storage.table)
            [chat] = await list_chats(client, Pacer(None))
            assert isinstance(chat, ChatSummary) and chat.chat_id == "busy"
            entity = await client.get_entity("busy", "state")
            entity["LastUpdatedAt"] = NOW
            await client.update_entity(entity)
            result = await purge_chat(client, chat, Pacer(None))
        assert (result.status, result.rows) == ("changed", 0)
        assert (await row_counts(storage))["busy"] == 7

    run(scenario())


def test_durations_and_the_rate_bound() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("1d12h") == timedelta(hours=36)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("30", "d", "0d", "30 days", "-1d", ""):
        with pytest.raises(Exception, match="duration"):
            parse_duration(bad)

    async def paced() -> float:
        pacer = Pacer(50)
        started = time.monotonic()
        for _ in range(11):
            await pacer.wait()
        return time.monotonic() - started

    # 11 requests at 50/s: the 11th goes 10 intervals (0.2 s) after the first.
    assert 0.18 <= asyncio.run(paced()) < 2
