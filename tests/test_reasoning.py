"""Reasoning models on the ``responses`` API keep their chain of thought across tool rounds,
end to end: a worker on Azurite, the fake model (whose reasoning models start their output with
a reasoning item, and check the encrypted content they are given back), the weather tools.

A tool round's follow-up is chained to the response that asked for the calls
(``previous_response_id``: the service holds the reasoning); when that response is gone (the
service forgets background responses some minutes after they end), the whole history is sent
with the run's reasoning items, their encrypted content included, each before its calls.
"""

from __future__ import annotations

import json
from typing import Any

from handlers.tools import ToolRegistry
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    WEATHER_ANSWER,
    ReplyQueue,
    burst,
    chat_rows,
    create_body,
    getCityNickname,
    getWeatherAtLocation,
    model_env,
    post_body,
    tool_registry,
)
from worker.testing import FakeOpenAI, RecordedRequest

MODEL = "o-reasoner-weather"  # a reasoning model ("reason") that plays the weather bot
QUESTION = "What's the weather like right now in my favorite city?"


def creates(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in requests if r.endpoint == "responses.create"]


def reasoning_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in body.get("input", []) if item.get("type") == "reasoning"]


def weather_turn(storage: StorageEnv, tools: ToolRegistry, fake: FakeOpenAI) -> Any:
    """One weather turn of a reasoning model on ``responses``; the reply and the chat's rows."""
    chat_id = f"reason-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario() -> Any:
        settings = storage.settings(
            **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=MODEL),
            WORKER_MODEL_API="responses",
        )
        await storage.send(create_body(chat_id, storage.table))
        await storage.send(post_body(chat_id, storage.table, QUESTION, replyTo=replies.name))
        await burst(settings, tools)
        [reply] = await replies.wait_for("assistantReply", 10)
        return reply, await chat_rows(storage, chat_id, storage.table)

    return run(scenario())


def test_a_chained_tool_round_leaves_the_reasoning_to_the_service(storage: StorageEnv) -> None:
    with FakeOpenAI(background_delay=0.05).running_in_thread() as fake:
        reply, rows = weather_turn(storage, tool_registry(), fake)
        requests = fake.requests
    assert (reply["status"], reply["content"]) == ("completed", WEATHER_ANSWER)
    _first, *follow_ups = creates(requests)
    assert len(follow_ups) == 2
    assert all(r.json["include"] == ["reasoning.encrypted_content"] for r in creates(requests))
    for request in follow_ups:
        assert request.status == 200 and request.json.get("previous_response_id")
        assert reasoning_items(request.json) == []
    # The run keeps its rounds' reasoning (for a broken chain), split in its row if need be.
    [run_row] = rows.runs
    handle = json.loads(
        str(run_row["Handle"])
        + "".join(
            str(run_row.get(f"HandlePart{n}", ""))
            for n in range(2, int(run_row.get("HandleParts") or 1) + 1)
        )
    )
    assert [len(r["callIds"]) for r in handle["reasoning"]] == [1, 2]
    assert all(r["items"][0]["encrypted_content"] for r in handle["reasoning"])


def test_a_broken_chain_sends_the_reasoning_back_with_the_tool_outputs(
    storage: StorageEnv,
) -> None:
    """The favourite-city tool runs while the service forgets the response that asked for it:
    the follow-up cannot be chained, so it carries the whole history and the round's reasoning
    item, before its call; the fake accepts its encrypted content, the run completes."""
    with FakeOpenAI(background_delay=0.05).running_in_thread() as fake:

        def getUserFavoriteCity() -> str:
            """Get the user's favorite city."""
            fake.expire_responses()
            return "Seattle, WA"

        tools = ToolRegistry([getUserFavoriteCity, getCityNickname, getWeatherAtLocation])
        reply, rows = weather_turn(storage, tools, fake)
        requests = fake.requests
    assert (reply["status"], reply["content"]) == ("completed", WEATHER_ANSWER)
    _first, chained, whole, last = creates(requests)
    assert chained.status == 400  # previous_response_not_found
    assert whole.status == 200 and "previous_response_id" not in whole.json
    kinds = [item.get("type", "message") for item in whole.json["input"]]
    assert kinds == ["message", "message", "reasoning", "function_call", "function_call_output"]
    [item] = reasoning_items(whole.json)
    assert item["encrypted_content"] and item["id"].startswith("rs_")
    # The next round is chained again (its response is stored).
    assert last.status == 200 and last.json["previous_response_id"]
    assert rows.roles[-1] == "Assistant"
