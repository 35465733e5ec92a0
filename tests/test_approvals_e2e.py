"""Approvals end to end (SPEC §4.3a, §5.5): a call that needs a person's decision parks its
run; decisions come through the real requests queue on Azurite; the worker (in-process, the
fake model over real HTTP, scripted) runs approved calls once and answers denied ones.

Each test is bounded; waits poll a queue or a table instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from schemas import ToolApprovalRequired
from tests.support.approval_tools import approval_registry
from tests.support.cli import clean_env, cli
from tests.support.env import StorageEnv, run
from tests.support.http_faults import FaultProxy, with_endpoint
from tests.support.runs import (
    TOOL_LOG_ENV,
    ReplyQueue,
    ToolLog,
    burst,
    chat_rows,
    create_body,
    eventually,
    history_problems,
    model_env,
    poison_letters,
    post_body,
    query_state,
    serving,
)
from tests.support.scrape import fetch
from worker.config.settings import Settings
from worker.testing import FakeOpenAI
from worker.testing.fake_openai_brain import Conversation, Turn

MODEL = "mail-bot"
LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookupOrder",
        "description": "Find an order (answered by the producer).",
        "parameters": {"type": "object", "properties": {"orderId": {"type": "integer"}}},
    },
}


def mail_bot(conversation: Conversation) -> Turn:
    """The fake model: ``send_email`` with the user's text as its subject, to the address in
    it (else bo@example.com) ("mixed ...": with the weather and an order lookup in the same
    round; "wire ...": ``wire_money`` instead), then an answer that quotes every result."""
    results = conversation.tool_results()
    if results:
        return {"content": " | ".join(f"{name}: {results[name]}" for name in sorted(results))}
    text = conversation.last_user_text()
    if text.startswith("wire"):
        return {"tool_calls": [{"name": "wire_money", "arguments": {"amount": 5}}]}
    to = next((word for word in text.split() if "@" in word), "bo@example.com")
    calls: list[dict[str, Any]] = [{"name": "send_email", "arguments": {"to": to, "subject": text}}]
    if text.startswith("mixed"):
        calls += [
            {"name": "getWeatherAtLocation", "arguments": {"location": "Oslo"}},
            {"name": "lookupOrder", "arguments": {"orderId": 7}},
        ]
    return {"tool_calls": calls}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running_in_thread() as server:
        server.set_default(mail_bot)
        yield server


@pytest.fixture
def tool_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ToolLog]:
    path = tmp_path / "tools.jsonl"
    monkeypatch.setenv(TOOL_LOG_ENV, str(path))
    yield ToolLog(path)


def settings_for(storage: StorageEnv, fake: FakeOpenAI, **extra: str) -> Settings:
    return storage.settings(**model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=MODEL), **extra)


async def create(storage: StorageEnv, settings: Settings, chat_id: str, **fields: Any) -> None:
    """Create the assistant and wait until it exists."""
    await storage.send(create_body(chat_id, storage.table, **fields))
    await burst(settings, approval_registry())
    rows = await storage.partition(chat_id, storage.table)
    assert rows.get("state", {}).get("Exists") is True, rows


def decision(
    storage: StorageEnv, chat_id: str, run_id: str, call_id: str, approve: bool, **fields: Any
) -> dict[str, Any]:
    """A producer's submitToolApprovals deciding one call (``by``, ``reason``, ``requestId``)."""
    request_id = fields.pop("requestId", None)
    body: dict[str, Any] = {
        "type": "submitToolApprovals",
        "id": chat_id,
        "collectionName": storage.table,
        "runId": run_id,
        "approvals": [{"toolCallId": call_id, "approve": approve, **fields}],
    }
    if request_id is not None:
        body["requestId"] = request_id
    return body


def tool_rows(rows: Any) -> list[dict[str, Any]]:
    return [m for m in rows.messages if m["Role"] == "Tool"]


# --- approve ------------------------------------------------------------------------------------


def test_an_approved_call_waits_for_its_decision_then_runs_once(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """The call is not run when the model asks: the run waits in requires_action, the
    producer gets toolApprovalRequired (every field present), `state` shows what waits. The
    approval resumes the run: the call runs once, the model goes on, and who approved, why and
    when are kept on the call's Tool message and shown by the query and the reply."""
    chat_id = f"approve-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    key = "approvals-query-key-0123456789"
    settings = settings_for(
        storage, fake, WORKER_HTTP_PORT="0", WORKER_HTTP_HOST="127.0.0.1", WORKER_QUERY_KEYS=key
    )

    async def scenario() -> dict[str, Any]:
        await create(storage, settings, chat_id, approvalRequired=["send_email"])
        found: dict[str, Any] = {}
        async with serving(settings, approval_registry()) as app:
            post = post_body(chat_id, storage.table, "lunch at noon", replyTo=replies.name,
                             requestId="ask", traceparent=TRACEPARENT)  # fmt: skip
            await storage.send(post)
            [found["asked"]] = await replies.wait_for("toolApprovalRequired", 30)
            found["state"] = await query_state(settings, chat_id, storage.table)
            found["rows"] = await chat_rows(storage, chat_id, storage.table)
            found["ran"] = tool_log.count()
            asked = found["asked"]
            await storage.send(
                decision(storage, chat_id, asked["runId"], asked["toolCalls"][0]["id"], True,
                         by="ana@example.com", reason="fine by me", requestId="yes")
            )  # fmt: skip
            [found["reply"]] = await replies.wait_for("assistantReply", 30)
            found["http"] = await fetch(
                app, f"/assistants/{chat_id}", headers={"x-functions-key": key},
                collectionName=storage.table,
            )  # fmt: skip
        found["final"] = await query_state(settings, chat_id, storage.table)
        found["done"] = await chat_rows(storage, chat_id, storage.table)
        return found

    found = run(scenario())
    asked = found["asked"]
    assert set(asked) == {f.alias for f in ToolApprovalRequired.model_fields.values()}
    assert (asked["id"], asked["requestId"], asked["truncated"]) == (chat_id, "ask", False)
    assert asked["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    [call] = asked["toolCalls"]
    assert (call["name"], call["server"]) == ("send_email", None)
    assert json.loads(call["arguments"]) == {"to": "bo@example.com", "subject": "lunch at noon"}
    assert found["ran"] == {}, "nothing runs before the decision"
    assert found["rows"].runs[0]["Status"] == "requires_action"
    [summary] = found["state"].runs
    [waiting] = summary.waiting_tool_calls
    assert (waiting.id, waiting.name, waiting.waits_for) == (call["id"], "send_email", "approval")

    reply = found["reply"]
    assert reply["status"] == "completed", reply
    assert reply["content"] == "send_email: sent to bo@example.com: lunch at noon"
    assert tool_log.count() == {("send_email", "lunch at noon"): 1}
    [tool_message] = [m for m in reply["recentMessages"] if m["role"] == "Tool"]
    assert tool_message["approval"]["approved"] is True
    assert tool_message["approval"]["by"] == "ana@example.com"

    done = found["done"]
    [row] = tool_rows(done)
    assert (row["Name"], row["Approval"], row["ApprovalBy"]) == (call["id"], "approved",
                                                                 "ana@example.com")  # fmt: skip
    assert row["ApprovalReason"] == "fine by me" and row["ApprovalAt"] is not None
    assert history_problems(done.messages) == []
    final = found["final"]
    [audited] = [m for m in final.recent_messages if m.role == "Tool"]
    assert audited.approval is not None
    assert (audited.approval.approved, audited.approval.by) == (True, "ana@example.com")
    assert audited.approval.reason == "fine by me" and audited.approval.decided_at is not None
    assert final.runs[0].waiting_tool_calls == []
    http = found["http"]
    assert http.status == 200, http.text
    [over_http] = [m for m in http.json["recentMessages"] if m["role"] == "Tool"]
    assert over_http["approval"] == {
        "approved": True,
        "by": "ana@example.com",
        "reason": "fine by me",
        "decidedAt": over_http["approval"]["decidedAt"],
    }
    assert not any(key.startswith("claim") or key.startswith("tool-") for key in
                   run(storage.partition(chat_id, storage.table))), "no claim row left"  # fmt: skip


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# --- deny ---------------------------------------------------------------------------------------


def test_a_denied_call_is_answered_denied_and_never_runs(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """The model reads `denied: <reason>` as the call's result and goes on; the tool never
    runs; the decision is kept with the call. A tool declared @tool(approval=True) waits for a
    decision even when the assistant names no tool in approvalRequired."""
    chat_id = f"deny-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    settings = settings_for(storage, fake)

    async def scenario() -> dict[str, Any]:
        await create(storage, settings, chat_id)
        found: dict[str, Any] = {}
        async with serving(settings, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "wire it", replyTo=replies.name,
                                         requestId="ask"))  # fmt: skip
            [asked] = await replies.wait_for("toolApprovalRequired", 30)
            [call] = asked["toolCalls"]
            found["call"] = call
            await storage.send(
                decision(storage, chat_id, asked["runId"], call["id"], False,
                         reason="over the limit", by="bo")
            )  # fmt: skip
            [found["reply"]] = await replies.wait_for("assistantReply", 30)
        found["rows"] = await chat_rows(storage, chat_id, storage.table)
        return found

    found = run(scenario())
    assert found["call"]["name"] == "wire_money"
    assert found["reply"]["status"] == "completed"
    assert found["reply"]["content"] == "wire_money: denied: over the limit"
    assert tool_log.entries() == [], "a denied call never runs"
    [row] = tool_rows(found["rows"])
    assert row["Content"] == "denied: over the limit"
    assert (row["Approval"], row["ApprovalBy"], row["ApprovalReason"]) == (
        "denied",
        "bo",
        "over the limit",
    )
    last = fake.requests[-1].json["messages"]
    assert last[-1] == {
        "role": "tool",
        "tool_call_id": found["call"]["id"],
        "content": "denied: over the limit",
    }


# --- a round mixing an approval, a local call and an external tool ------------------------------


def test_a_round_mixing_an_approval_a_local_call_and_an_external_tool(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """The local call runs at once, without waiting; then the run waits for both producers:
    toolApprovalRequired names only the call that needs approval, toolCallsRequired only the
    external one. The output comes first: the run still waits; the approval resumes it, the
    approved call runs once, and every call of the round is answered."""
    chat_id = f"mixed-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    settings = settings_for(storage, fake)

    async def scenario() -> dict[str, Any]:
        await create(storage, settings, chat_id, approvalRequired=["send_email"],
                     tools=["getWeatherAtLocation", "send_email", LOOKUP_ORDER])  # fmt: skip
        found: dict[str, Any] = {}
        async with serving(settings, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "mixed plans",
                                         replyTo=replies.name, requestId="ask"))  # fmt: skip
            [asked] = await replies.wait_for("toolApprovalRequired", 30)
            [required] = await replies.wait_for("toolCallsRequired", 30)
            found.update(asked=asked, required=required, ran=tool_log.count())
            [lookup] = required["toolCalls"]
            await storage.send({"type": "submitToolOutputs", "id": chat_id,
                                "collectionName": storage.table, "runId": required["runId"],
                                "toolOutputs": [{"toolCallId": lookup["id"],
                                                 "output": "order 7 shipped"}]})  # fmt: skip
            await eventually(lambda: _answered(storage, chat_id, 2), 30, "the output stored")
            found["still"] = await chat_rows(storage, chat_id, storage.table)
            [mail] = asked["toolCalls"]
            await storage.send(decision(storage, chat_id, asked["runId"], mail["id"], True))
            [found["reply"]] = await replies.wait_for("assistantReply", 30)
        found["rows"] = await chat_rows(storage, chat_id, storage.table)
        return found

    found = run(scenario())
    assert [c["name"] for c in found["asked"]["toolCalls"]] == ["send_email"]
    assert [c["name"] for c in found["required"]["toolCalls"]] == ["lookupOrder"]
    assert found["ran"] == {("getWeatherAtLocation", "Oslo"): 1}, "the local call ran at once"
    assert found["still"].runs[0]["Status"] == "requires_action"
    reply = found["reply"]
    assert reply["status"] == "completed", reply
    assert reply["content"] == (
        "getWeatherAtLocation: 70 degrees and sunny | lookupOrder: order 7 shipped"
        " | send_email: sent to bo@example.com: mixed plans"
    )
    assert tool_log.count() == {
        ("getWeatherAtLocation", "Oslo"): 1,
        ("send_email", "mixed plans"): 1,
    }
    rows = found["rows"]
    assert history_problems(rows.messages) == []
    audited = {row["Content"]: row.get("Approval") for row in tool_rows(rows)}
    assert audited == {
        "70 degrees and sunny": None,
        "order 7 shipped": None,
        "sent to bo@example.com: mixed plans": "approved",
    }


def test_an_approval_event_lost_with_its_send_comes_with_the_posts_redelivery(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """The round's toolCallsRequired goes out, its toolApprovalRequired cannot be sent (the
    reply queue refuses every attempt the SDK makes): the post fails and comes back. Before it
    does, the producer's output for the external call is stored, and that commit does not
    carry the run. The redelivered post still sends what the run waits for: the approval
    event comes, the call is approved, runs once, and the run completes (the chaos soak found
    a run whose event was lost this way wait for its deadline)."""
    chat_id = f"lost-ask-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")

    async def scenario(proxy: FaultProxy) -> dict[str, Any]:
        plain = settings_for(storage, fake)
        await create(storage, plain, chat_id, approvalRequired=["send_email"],
                     tools=["getWeatherAtLocation", "send_email", LOOKUP_ORDER])  # fmt: skip
        # The first event to the reply queue passes; every attempt of the second fails.
        lost = proxy.add("fail", f"/{replies.name}/messages", method="POST", skip=1, count=4)
        proxied = settings_for(
            storage,
            fake,
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Queue", proxy.port),
        )
        found: dict[str, Any] = {}
        async with serving(proxied, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "mixed plans",
                                         replyTo=replies.name, requestId="ask"))  # fmt: skip
            [required] = await replies.wait_for("toolCallsRequired", 30)
            await eventually(lambda: _true(lost.done), 30, "the approval event's send to fail")
            [lookup] = required["toolCalls"]
            await storage.send({"type": "submitToolOutputs", "id": chat_id,
                                "collectionName": storage.table, "runId": required["runId"],
                                "toolOutputs": [{"toolCallId": lookup["id"],
                                                 "output": "order 7 shipped"}]})  # fmt: skip
            # Stored well before the post comes back (the SDK's own retries of the failed
            # send, then the post's retry delay, take seconds).
            await eventually(lambda: _answered(storage, chat_id, 2), 30, "the output stored")
            [asked] = await replies.wait_for("toolApprovalRequired", 30)
            [mail] = asked["toolCalls"]
            await storage.send(decision(storage, chat_id, asked["runId"], mail["id"], True))
            [found["reply"]] = await replies.wait_for("assistantReply", 30)
        found["rows"] = await chat_rows(storage, chat_id, storage.table)
        return found

    with FaultProxy(storage.azurite.queue_port) as proxy:
        found = run(scenario(proxy))
    assert found["reply"]["status"] == "completed", found["reply"]
    assert tool_log.count() == {
        ("getWeatherAtLocation", "Oslo"): 1,
        ("send_email", "mixed plans"): 1,
    }
    assert history_problems(found["rows"].messages) == []


async def _answered(storage: StorageEnv, chat_id: str, count: int) -> bool:
    rows = await chat_rows(storage, chat_id, storage.table)
    return len(tool_rows(rows)) >= count


# --- two approvers at the same instant ----------------------------------------------------------


def test_two_approvers_deciding_the_same_call_differently_at_once(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """Both decisions are read against the same state of the run: the first commit to leave
    is held on the wire (an HTTP proxy in front of the table service) until the other one
    landed. The one stored first stands; the other is acknowledged (not dead-lettered),
    ignored and logged; the call runs once or never, as the standing decision says, and the
    audit names its approver."""
    chat_id = f"two-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    settings = settings_for(storage, fake)

    async def scenario(proxy: FaultProxy) -> dict[str, Any]:
        await create(storage, settings, chat_id, approvalRequired=["send_email"])
        found: dict[str, Any] = {}
        async with serving(settings, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "two minds",
                                         replyTo=replies.name, requestId="ask"))  # fmt: skip
            [asked] = await replies.wait_for("toolApprovalRequired", 30)
        [call] = asked["toolCalls"]
        await storage.send(decision(storage, chat_id, asked["runId"], call["id"], True,
                                    by="ana", requestId="ana"))  # fmt: skip
        await storage.send(decision(storage, chat_id, asked["runId"], call["id"], False,
                                    by="bo", reason="no", requestId="bo"))  # fmt: skip
        held = proxy.add("hold", r"/\$batch", method="POST")
        proxied = settings_for(
            storage,
            fake,
            AzureWebJobsStorage=with_endpoint(storage.connection_string, "Table", proxy.port),
        )
        with structlog.testing.capture_logs() as logs:
            async with serving(proxied, approval_registry()):
                await eventually(lambda: _true(held.done), 30, "the first commit on the wire")
                found["first"] = await eventually(
                    lambda: _decided(storage, chat_id), 30, "the other decision stored"
                )
                proxy.release()
                [found["reply"]] = await replies.wait_for("assistantReply", 30)
                await eventually(
                    lambda: _empty(storage, storage.requests_queue), 30, "both decisions acked"
                )
        found["logs"] = logs
        found["rows"] = await chat_rows(storage, chat_id, storage.table)
        found["letters"] = await poison_letters(storage, storage.requests_poison)
        return found

    with FaultProxy(storage.azurite.table_port) as proxy:
        found = run(scenario(proxy))
    [row] = tool_rows(found["rows"])
    standing = row["ApprovalBy"]
    assert standing in ("ana", "bo")
    approved = standing == "ana"
    assert found["first"] == [[call_id, approved] for call_id in [row["Name"]]]
    assert row["Approval"] == ("approved" if approved else "denied")
    assert tool_log.count() == ({("send_email", "two minds"): 1} if approved else {})
    assert found["reply"]["status"] == "completed"
    assert found["letters"] == [], "the second decision is acknowledged, not refused"
    [ignored] = [e for e in found["logs"] if e["event"] == "approval.ignored"]
    assert ignored["tool_call_id"] == row["Name"]
    assert ignored["standing"] == ("approve" if approved else "deny")
    assert ignored["ignored"] == ("deny" if approved else "approve")
    assert ignored["ignored_by"] == ("bo" if approved else "ana")
    assert ignored["log_level"] == "warning"


async def _true(value: bool) -> bool:
    return value


async def _decided(storage: StorageEnv, chat_id: str) -> list[Any] | None:
    """The run row's decided calls, once there are any."""
    rows = await chat_rows(storage, chat_id, storage.table)
    decided = json.loads(rows.runs[0].get("CallsDecided") or "[]")
    return decided or None


async def _empty(storage: StorageEnv, queue: str) -> bool:
    return await storage.count(queue) == 0


# --- refusals -----------------------------------------------------------------------------------


def test_decisions_for_calls_that_wait_for_none_are_refused_and_repeats_ignored(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """An unknown call id is dead-lettered with a reason naming the calls that wait; the same
    decision sent again once the run ended is acknowledged and ignored (not refused); a
    decision for a run that no longer waits is refused."""
    chat_id = f"refuse-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    settings = settings_for(storage, fake)

    async def scenario() -> dict[str, Any]:
        await create(storage, settings, chat_id, approvalRequired=["send_email"])
        found: dict[str, Any] = {}
        async with serving(settings, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "refusals",
                                         replyTo=replies.name, requestId="ask"))  # fmt: skip
            [asked] = await replies.wait_for("toolApprovalRequired", 30)
            run_id, [call] = asked["runId"], asked["toolCalls"]
            await storage.send(decision(storage, chat_id, run_id, "call_nope", True,
                                        requestId="wrong"))  # fmt: skip
            await eventually(lambda: _letters(storage, 1), 30, "the wrong decision refused")
            good = decision(storage, chat_id, run_id, call["id"], True, requestId="good")
            await storage.send(good)
            await replies.wait_for("assistantReply", 30)
            await storage.send({**good, "requestId": "again"})
            await storage.send(decision(storage, chat_id, run_id, "call_late", False,
                                        requestId="late"))  # fmt: skip
            found["letters"] = await eventually(lambda: _letters(storage, 2), 30, "late refused")
            await eventually(lambda: _empty(storage, storage.requests_queue), 30, "the repeat")
        return found

    letters = {le["deadLetter"]["requestId"]: le["deadLetter"] for le in run(scenario())["letters"]}
    assert set(letters) == {"wrong", "late"}
    assert "call_nope" in letters["wrong"]["reason"]
    assert "waiting for approval" in letters["wrong"]["reason"]
    assert letters["wrong"]["errorType"] == "InvalidToolApprovals"
    assert "not waiting for approvals" in letters["late"]["reason"]
    assert tool_log.count() == {("send_email", "refusals"): 1}


async def _letters(storage: StorageEnv, count: int) -> list[dict[str, Any]] | None:
    letters = await poison_letters(storage, storage.requests_poison)
    return letters if len(letters) >= count else None


# --- the deadline -------------------------------------------------------------------------------


def test_the_deadline_ends_a_run_waiting_for_approval(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """Nobody decides: at its deadline the run ends expired, the waiting call is answered (it
    was never run) so the history stays valid, the chat's next post runs, and a decision that
    comes too late is refused."""
    chat_id = f"expire-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    settings = settings_for(storage, fake, WORKER_RUN_TIMEOUT="3")

    async def scenario() -> dict[str, Any]:
        await create(storage, settings, chat_id, approvalRequired="all")
        found: dict[str, Any] = {}
        async with serving(settings, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "nobody answers",
                                         replyTo=replies.name, requestId="first"))  # fmt: skip
            [asked] = await replies.wait_for("toolApprovalRequired", 30)
            [found["expired"]] = await replies.wait_for("assistantReply", 30, requestId="first")
            [call] = asked["toolCalls"]
            await storage.send(decision(storage, chat_id, asked["runId"], call["id"], True,
                                        requestId="late"))  # fmt: skip
            found["letters"] = await eventually(lambda: _letters(storage, 1), 30, "late refused")
        found["rows"] = await chat_rows(storage, chat_id, storage.table)
        return found

    found = run(scenario())
    assert found["expired"]["status"] == "expired"
    assert tool_log.entries() == []
    rows = found["rows"]
    [row] = tool_rows(rows)
    assert row["Content"] == (
        "error: the run expired while this call waited for approval; it was not run"
    )
    assert history_problems(rows.messages) == []
    [letter] = found["letters"]
    assert "not waiting for approvals" in letter["deadLetter"]["reason"]


# --- the CLI ------------------------------------------------------------------------------------


def test_send_approve_and_deny_from_the_cli_and_state_shows_what_waits(
    storage: StorageEnv, fake: FakeOpenAI, tool_log: ToolLog
) -> None:
    """`assistant-worker state` shows the call that waits for a decision; `send approve`
    (with --by and --reason) decides it; a second round is refused with `send deny`; `state`
    then shows both decisions on the calls' Tool messages."""
    chat_id = f"cli-{storage.suffix}"
    replies = ReplyQueue(storage, f"replies-{storage.suffix}")
    settings = settings_for(storage, fake)
    env = clean_env(**storage.env(**model_env(fake.base_url)))

    async def decide(round_number: int, verdict: str, *extra: str) -> dict[str, Any]:
        asked = (await replies.wait_for("toolApprovalRequired", 30, count=round_number))[-1]
        code, out, err = await cli(env, "state", chat_id, "--collection", storage.table)
        assert code == 0, err
        [waiting] = json.loads(out)["runs"][-1]["waitingToolCalls"]
        assert waiting["waitsFor"] == "approval"
        code, _, err = await cli(env, "send", verdict, chat_id, asked["runId"], waiting["id"],
                                 "--collection", storage.table, *extra)  # fmt: skip
        assert code == 0, err
        [reply] = await replies.wait_for("assistantReply", 30, runId=asked["runId"])
        return reply

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        await create(storage, settings, chat_id, approvalRequired=["send_email"])
        async with serving(settings, approval_registry()):
            await storage.send(post_body(chat_id, storage.table, "first", replyTo=replies.name))
            approved = await decide(1, "approve", "--by", "ana", "--reason", "ok")
            await storage.send(post_body(chat_id, storage.table, "second", replyTo=replies.name))
            denied = await decide(2, "deny", "--by", "bo", "--reason", "enough mail")
        code, out, err = await cli(env, "state", chat_id, "--collection", storage.table)
        assert code == 0, err
        return approved, denied, json.loads(out)

    approved, denied, state = run(scenario())
    assert approved["content"] == "send_email: sent to bo@example.com: first"
    assert denied["content"] == "send_email: denied: enough mail"
    audits = [m["approval"] for m in state["recentMessages"] if m["role"] == "Tool"]
    assert [(a["approved"], a["by"], a["reason"]) for a in audits] == [
        (True, "ana", "ok"),
        (False, "bo", "enough mail"),
    ]
    assert all(run_["waitingToolCalls"] == [] for run_ in state["runs"])
    assert tool_log.count() == {("send_email", "first"): 1}
