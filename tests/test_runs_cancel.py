"""Deleting or resetting a chat ends its runs: producers waiting on them are told."""

from collections.abc import Iterator
from typing import Any

import pytest

from handlers.query import get_state
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ReplyQueue,
    burst,
    create_body,
    eventually,
    model_env,
    post_body,
    serving,
)
from worker.testing import FakeOpenAI

LOOKUP = {
    "type": "function",
    "function": {"name": "lookupOrder", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay=0.05).running_in_thread() as server:
        server.script("*", [{"tool_calls": [{"name": "lookupOrder", "arguments": {}}]}] * 4)
        yield server


@pytest.mark.parametrize("ending", ["delete", "reset"])
def test_waiting_and_queued_runs_get_a_cancelled_reply(
    storage: StorageEnv, fake: FakeOpenAI, ending: str
) -> None:
    """The active run (waiting for an external tool) and the one queued behind it both get
    an assistantReply with status cancelled; the state query listed them before."""
    chat_id = f"cancel-{ending}-{storage.suffix}"
    settings = storage.settings(**model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="orders"))
    replies = ReplyQueue(storage, f"rep-{storage.suffix}")

    # The create is applied before any post: a post racing its create is dead-lettered.
    run(storage.send(create_body(chat_id, "ChatState", tools=[LOOKUP])))
    run(burst(settings))

    async def scenario() -> tuple[list[dict[str, Any]], list[str]]:
        async with serving(settings) as app:
            store = await app.stores.get("AzureWebJobsStorage", "ChatState")
            for n in range(2):
                await storage.send(post_body(chat_id, "ChatState", f"order {n}?",
                                             replyTo=replies.name, requestId=f"p{n}"))  # fmt: skip
                if n == 0:
                    await replies.wait_for("toolCallsRequired", 30)

            async def both_listed() -> list[str] | None:
                statuses = [str(r.status) for r in (await get_state(store, chat_id)).runs]
                return statuses if len(statuses) == 2 else None

            listed = await eventually(both_listed, 30, "both runs listed by the state query")
            if ending == "delete":
                await storage.send({"type": "assistantDelete", "id": chat_id})
            else:
                await storage.send(create_body(chat_id, "ChatState", requestId="again"))
            cancelled = await replies.wait_for("assistantReply", 30, count=2, status="cancelled")
            return cancelled, listed

    cancelled, listed = run(scenario())
    assert listed == ["requires_action", "queued"]
    assert sorted(e["requestId"] for e in cancelled) == ["p0", "p1"]
    assert all(
        "was " + ("deleted" if ending == "delete" else "reset") in e["error"] for e in cancelled
    )
