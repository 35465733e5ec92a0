"""Names from messages create nothing (issue 13, item 11), through the real queues: only an
``assistantCreate`` makes the table its ``collectionName`` names. A post, submit or delete
naming a table that does not exist finds no chat: the post and submit are dead-lettered
``UnknownAssistant`` once the create grace is over, the delete has nothing to do; and no table
is left behind."""

from __future__ import annotations

from typing import Any

from tests.support.env import StorageEnv, run
from tests.support.runs import burst, create_body, poison_letters, post_body


async def table_names(storage: StorageEnv) -> set[str]:
    async with storage.tables() as service:
        return {table.name async for table in service.list_tables()}


def test_a_post_submit_or_delete_naming_a_new_table_leaves_no_table(storage: StorageEnv) -> None:
    made_up = {kind: f"Made{kind}{storage.suffix}" for kind in ("Post", "Submit", "Delete")}
    settings = storage.settings(WORKER_CREATE_GRACE="0")

    async def scenario() -> dict[str, Any]:
        await storage.send(post_body("chat-1", made_up["Post"], "hello", requestId="post"))
        await storage.send(
            {
                "type": "submitToolOutputs",
                "id": "chat-1",
                "collectionName": made_up["Submit"],
                "runId": "run_000001_cafe",
                "requestId": "submit",
                "toolOutputs": [{"toolCallId": "call_1", "output": "42"}],
            }
        )
        await storage.send(
            {
                "type": "assistantDelete",
                "id": "chat-1",
                "collectionName": made_up["Delete"],
                "requestId": "delete",
            }
        )
        app = await burst(settings)
        return {
            "tables": await table_names(storage),
            "letters": await poison_letters(storage, storage.requests_poison),
            "stats": dict(app.worker.stats),
        }

    result = run(scenario())
    assert not set(made_up.values()) & result["tables"], result["tables"]
    letters = {letter["deadLetter"]["requestId"]: letter for letter in result["letters"]}
    assert set(letters) == {"post", "submit"}, "the delete had nothing to do, and succeeded"
    for letter in letters.values():
        assert letter["deadLetter"]["errorType"] == "UnknownAssistant", letter


def test_a_create_makes_its_table_and_the_chat_then_takes_posts(storage: StorageEnv) -> None:
    """The table a create names is made (once), and the posts that follow use it."""
    table = f"Created{storage.suffix}"

    async def scenario() -> tuple[set[str], list[dict[str, Any]], dict[str, Any]]:
        settings = storage.settings()
        await storage.send(create_body("chat-2", table))
        await burst(settings)
        await storage.send(post_body("chat-2", table, "hello"))
        await burst(settings)
        rows = await storage.partition("chat-2", table)
        return await table_names(storage), await poison_letters(storage), rows

    tables, letters, rows = run(scenario())
    assert table in tables
    assert letters == []
    assert rows["state"]["TotalMessages"] >= 2, rows["state"]
