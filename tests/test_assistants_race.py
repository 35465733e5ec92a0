"""The ``assistants`` backend through the real queues (Azurite) and the fake model: two
copies of a run's first step start its remote run at the same instant. The service refuses
one ``runs.create`` with 400 "thread already has an active run"; that is a race, handled as
one: no failure, one remote run, the run completes."""

from __future__ import annotations

from typing import Any

from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ReplyQueue,
    chat_rows,
    create_body,
    duplicate_steps,
    model_env,
    poison_letters,
    post_body,
    serving,
)
from worker.testing import FakeOpenAI, RecordedRequest


def test_two_copies_of_a_first_step_start_one_remote_run(storage: StorageEnv) -> None:
    """The chat's second run (its thread exists) has every step sent twice. The first
    ``runs.create`` to arrive is held a moment, so the other copy's lands first and the held
    one is refused: 400 "already has an active run". The run completes, with no dead letter
    and one remote run for it; its user message is stored once.

    Here the winner's copy commits first, so the refused copy's outcome is dropped as stale
    either way; when the refused copy commits first, its outcome is what the run does next:
    ``test_backends`` (two copies of a first step) shows it is a Pending that adopts the
    winner's run, not a failure."""
    chat_id = f"assistants-race-{storage.suffix}"
    model = f"echo-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> tuple[list[dict[str, Any]], list[RecordedRequest], Any, Any, Any]:
        async with FakeOpenAI(background_delay=0.2) as fake:
            settings = storage.settings(
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=model)
            )
            await storage.send(create_body(chat_id, storage.table, api="assistants", tools=[]))
            async with serving(settings) as app:
                await storage.send(post_body(chat_id, storage.table, "first", replyTo=replies.name))
                await replies.wait_for("assistantReply", 30)
                doubled = duplicate_steps(app)
                fake.fault("slow", count=1, delay=0.5, endpoint="runs.create")
                # The winner's remote run stays active until the held copy is refused.
                fake.background_delay = 1.5
                await storage.send(
                    post_body(chat_id, storage.table, "second", replyTo=replies.name)
                )
                found = await replies.wait_for("assistantReply", 40, count=2)
            return (
                found,
                fake.requests,
                doubled,
                await chat_rows(storage, chat_id, storage.table),
                await poison_letters(storage),
            )

    found, requests, doubled, rows, letters = run(scenario())

    assert letters == []
    assert doubled, "the steps were duplicated"
    second = found[-1]
    assert second["status"] == "completed" and second["content"] == "You said: second"
    creates = [r for r in requests if r.endpoint == "runs.create"]
    # The start is claimed: the second copy follows the first's remote run instead of asking
    # for one (if it ever did, the service would refuse it, and that is handled too).
    refused = [r for r in creates if r.status == 400]
    assert len(refused) <= 1
    started = [r.json["metadata"]["runId"] for r in creates if r.status == 200]
    assert started.count(second["runId"]) == 1  # one remote run for the worker's run
    assert [m["Content"] for m in rows.messages if m["Role"] == "User"] == ["first", "second"]
    assert rows.roles[-2:] == ["User", "Assistant"]
