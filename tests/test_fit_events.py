"""``toolCallsRequired`` events always fit one queue message: the pure cut, and the event
of a run whose external call has ~200 KB of arguments through the real queues (Azurite)."""

from __future__ import annotations

import json
from typing import Any

from handlers.replies import fit_tool_calls
from schemas import (
    ApprovalCall,
    ToolApprovalRequired,
    ToolCallRequest,
    ToolCallsRequired,
    encode_body,
)
from schemas.decode import MAX_MESSAGE_BYTES, Encoding
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ReplyQueue,
    chat_rows,
    create_body,
    model_env,
    poison_letters,
    post_body,
    query_state,
    serving,
)
from worker.store.layout import join_text
from worker.testing import FakeOpenAI

MARKER = "[truncated by assistant-worker: showing "


def size(payload: dict[str, Any], encoding: Encoding = "none") -> int:
    return len(encode_body(payload, encoding).encode("utf-8"))


def event(*arguments: str) -> ToolCallsRequired:
    return ToolCallsRequired(
        id="chat",
        run_id="run",
        tool_calls=[
            ToolCallRequest(id=f"call_{n}", name=f"tool{n}", arguments=text)
            for n, text in enumerate(arguments)
        ],
    )


def test_an_event_that_fits_is_sent_whole() -> None:
    small = event('{"orderId": 1}', '{"orderId": 2}')
    payload = fit_tool_calls(small, "base64")
    assert payload == small.to_wire()
    assert payload["truncated"] is False


def test_the_longest_arguments_are_cut_and_every_call_kept() -> None:
    """One huge call among small ones: only it is cut, with a marker saying how much is
    shown; every call keeps its id and name; the event says truncated and fits."""
    huge = json.dumps({"note": "x" * 200_000})
    big = event('{"orderId": 1}', huge, '{"orderId": 3}')
    for encoding in ("none", "base64"):
        payload = fit_tool_calls(big, encoding)
        assert size(payload, encoding) <= MAX_MESSAGE_BYTES
        assert payload["truncated"] is True
        calls = payload["toolCalls"]
        assert [(c["id"], c["name"]) for c in calls] == [(c.id, c.name) for c in big.tool_calls]
        assert calls[0]["arguments"] == '{"orderId": 1}'
        assert calls[2]["arguments"] == '{"orderId": 3}'
        cut = calls[1]["arguments"]
        shown = cut.split("\n\n" + MARKER)[0]
        assert huge.startswith(shown) and len(shown) > 10_000
        assert f"{MARKER}{len(shown):,} of {len(huge):,} characters" in cut
        assert size(payload, encoding) > MAX_MESSAGE_BYTES - 2_000  # not cut more than needed


def test_an_approval_event_is_cut_like_tool_calls() -> None:
    """toolApprovalRequired: the huge call's arguments cut with the marker; every call keeps
    its id, name and server; every field of the event present."""
    huge = json.dumps({"body": "y" * 200_000})
    approval = ToolApprovalRequired(
        id="chat",
        run_id="run",
        request_id="post-1",
        tool_calls=[
            ApprovalCall(id="call_0", name="send_email", arguments=huge, server=None),
            ApprovalCall(id="call_1", name="bank__pay", arguments="{}", server="bank"),
        ],
    )
    payload = fit_tool_calls(approval, "base64")
    assert size(payload, "base64") <= MAX_MESSAGE_BYTES
    assert set(payload) == {f.alias for f in ToolApprovalRequired.model_fields.values()}
    assert (payload["truncated"], payload["requestId"]) == (True, "post-1")
    calls = payload["toolCalls"]
    assert [(c["id"], c["name"], c["server"]) for c in calls] == [
        ("call_0", "send_email", None),
        ("call_1", "bank__pay", "bank"),
    ]
    assert MARKER in calls[0]["arguments"] and calls[1]["arguments"] == "{}"


def test_two_long_arguments_are_cut_to_the_same_length() -> None:
    """The longest go first: two long ones end up the same length, a shorter one that fits
    beside them stays whole."""
    first, second, medium = "a" * 150_000, "b" * 90_000, "c" * 5_000
    payload = fit_tool_calls(event(first, second, medium), "none")
    assert size(payload) <= MAX_MESSAGE_BYTES
    calls = payload["toolCalls"]
    kept = [c["arguments"].split("\n\n" + MARKER)[0] for c in calls[:2]]
    assert len(kept[0]) == len(kept[1]) > 5_000
    assert calls[2]["arguments"] == medium


def test_multibyte_text_is_measured_in_bytes() -> None:
    """Three bytes a character: the cut is by the encoded size, not the character count."""
    payload = fit_tool_calls(event("中" * 60_000), "base64")
    assert size(payload, "base64") <= MAX_MESSAGE_BYTES
    assert payload["truncated"] is True
    assert json.loads(encode_body(payload))["toolCalls"][0]["id"] == "call_0"


def test_many_calls_keep_every_id() -> None:
    """Hundreds of calls of a few KB each: each keeps its id and name, the event fits."""
    payload = fit_tool_calls(
        event(*(f'{{"n": "{n:04d}{"y" * 2_000}"}}' for n in range(300))), "none"
    )
    assert size(payload) <= MAX_MESSAGE_BYTES
    assert [c["id"] for c in payload["toolCalls"]] == [f"call_{n}" for n in range(300)]


# --- end to end -----------------------------------------------------------------------------------

ATTACH = {
    "type": "function",
    "function": {
        "name": "attachDocument",
        "description": "Attach a document to an order; answered by the producer.",
        "parameters": {
            "type": "object",
            "properties": {"orderId": {"type": "integer"}, "document": {"type": "string"}},
        },
    },
}


def test_a_huge_external_call_is_announced_cut_and_kept_whole_in_the_chat(
    storage: StorageEnv,
) -> None:
    """The model calls an external tool with ~200 KB of arguments: the toolCallsRequired
    event arrives (it used to be refused by the queue and dropped), fits one message, is
    marked truncated and keeps the call's id and name; the chat's state has the whole call,
    and the producer's answer completes the run."""
    chat_id = f"huge-call-{storage.suffix}"
    model = f"attach-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    document = "".join(f"line {n:06d} of the scanned contract\n" for n in range(6_000))
    arguments = {"orderId": 7, "document": document}

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], Any, Any, list[Any]]:
        async with FakeOpenAI() as fake:
            fake.script(
                model,
                [
                    {"tool_calls": [{"name": "attachDocument", "arguments": arguments}]},
                    {"content": "Attached."},
                ],
            )
            settings = storage.settings(
                **model_env(
                    fake.base_url,
                    CHAT_MODEL_DEPLOYMENT_NAME=model,
                    WORKER_MESSAGE_ENCODING="base64",
                )
            )
            await storage.send(create_body(chat_id, storage.table, tools=[ATTACH]))
            async with serving(settings):
                await storage.send(
                    post_body(chat_id, storage.table, "attach it", replyTo=replies.name)
                )
                [required] = await replies.wait_for("toolCallsRequired", 30)
                state = await query_state(settings, chat_id, storage.table)
                rows = await chat_rows(storage, chat_id, storage.table)
                [call] = required["toolCalls"]
                await storage.send(
                    {
                        "type": "submitToolOutputs",
                        "id": chat_id,
                        "collectionName": storage.table,
                        "runId": required["runId"],
                        "toolOutputs": [{"toolCallId": call["id"], "output": "attached"}],
                    }
                )
                [reply] = await replies.wait_for("assistantReply", 30)
            return required, [reply], state, rows, await poison_letters(storage)

    required, [reply], state, rows, letters = run(scenario())

    assert letters == []
    assert required["truncated"] is True
    assert size(required, "base64") <= MAX_MESSAGE_BYTES
    [call] = required["toolCalls"]
    assert call["name"] == "attachDocument" and call["id"]
    whole = json.dumps(arguments)
    shown = call["arguments"].split("\n\n" + MARKER)[0]
    assert MARKER in call["arguments"] and len(shown) < len(whole)
    # The whole call is in the chat: the query's tool calls and the stored row.
    [asking] = [m for m in state.recent_messages if m.role == "Assistant" and m.tool_calls]
    [stored_call] = json.loads(asking.tool_calls or "[]")
    assert stored_call["id"] == call["id"]
    assert json.loads(stored_call["functionArguments"]) == arguments
    [row] = [m for m in rows.messages if m["Role"] == "Assistant" and m.get("ToolCalls")]
    assert json.loads(json.loads(join_text(row, "ToolCalls"))[0]["functionArguments"]) == arguments
    assert reply["status"] == "completed" and reply["content"] == "Attached."
