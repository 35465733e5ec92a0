"""Reply events always fit one queue message (pure)."""

import json

from handlers.replies import fit_reply
from schemas import AssistantMessage, AssistantReply, encode_body
from schemas.decode import MAX_MESSAGE_BYTES


def size(payload: dict[str, object]) -> int:
    return len(encode_body(payload, "none").encode())


def test_small_replies_are_unchanged() -> None:
    """A reply that fits is sent whole."""
    reply = AssistantReply(id="c", run_id="r", status="completed", content="hi")
    assert fit_reply(reply, "none") == reply.to_wire()


def test_the_oldest_messages_go_first() -> None:
    """Too many recent messages: the oldest are left out, the answer is kept whole."""
    messages = [AssistantMessage(content=f"{n}" * 3000, role="Tool") for n in range(40)]
    reply = AssistantReply(id="c", run_id="r", status="completed", content="answer",
                           recent_messages=messages)  # fmt: skip
    payload = fit_reply(reply, "base64")
    kept = payload["recentMessages"]
    assert isinstance(kept, list) and 0 < len(kept) < 40
    assert kept[-1]["content"] == messages[-1].content
    assert payload["content"] == "answer"
    assert len(encode_body(payload, "base64").encode()) <= MAX_MESSAGE_BYTES


def test_huge_content_and_error_are_cut_with_a_marker() -> None:
    """Content and error over a queue message are cut, saying so, and the call returns."""
    reply = AssistantReply(id="c", run_id="r", status="failed", content="x" * 200_000,
                           error="e" * 100_000)  # fmt: skip
    payload = fit_reply(reply, "none")
    assert size(payload) <= MAX_MESSAGE_BYTES
    assert "truncated by assistant-worker" in str(payload["content"])
    assert "truncated by assistant-worker" in str(payload["error"])
    assert json.dumps(payload)
