"""The short chaos soak (``python -m bench.chaos --short``, about 2 minutes): its audit passes.

Azurite's queue and table services apart, the fake model faulting 20 % of its calls, three
worker processes of which one is SIGKILLed every few seconds, a producer creating chats and
posting to them back to back and answering external tool calls (partial, concurrent and
duplicated submits), and the table service stopped for 15 s. ``make chaos`` is the long one.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.chaos_audit import INTERRUPTED, Collected, audit, failed
from bench.chaos_model import approves, chaos_scenario, final_answer, rounds, user_message
from worker.devtools.azurite import REPO_ROOT
from worker.testing.fake_openai_brain import Conversation, Message, ToolCall
from worker.testing.fake_openai_faults import FaultBook

# The soak bounds its own waits; this only guards against a harness that hangs.
TIMEOUT = 600


@pytest.mark.slow
def test_short_chaos_soak_passes_its_audit(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    with (tmp_path / "chaos.out").open("w+") as output:
        soak = subprocess.Popen(
            [sys.executable, "-m", "bench.chaos", "--short", "--seed", "7", "--out", str(out)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            returncode = soak.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            soak.terminate()  # the soak stops every process of its own on SIGTERM
            try:
                soak.wait(timeout=60)
            except subprocess.TimeoutExpired:
                soak.kill()  # its children die with it (PR_SET_PDEATHSIG)
                soak.wait(timeout=10)
            returncode = None
        output.seek(0)
        text = output.read()
    report = text[-16000:]
    assert returncode is not None, f"the short chaos soak ran past {TIMEOUT} s:\n{report}"
    assert returncode == 0, f"chaos audit failed (logs in {out}):\n{report}"
    assert "chaos: audit passed" in text, report


# -- the pieces, quickly ----------------------------------------------------------------------


def test_rate_faults_are_deterministic_per_seed() -> None:
    def fired(seed: int) -> list[bool]:
        book = FaultBook()
        book.add("500", rate=0.3, seed=seed)
        return [book.pick("chat", "chat.create", "m") is not None for _ in range(200)]

    assert fired(1) == fired(1)
    assert fired(1) != fired(2)
    assert 30 <= sum(fired(1)) <= 90
    with pytest.raises(ValueError, match="rate"):
        FaultBook().add("500", rate=1.5)


def test_chaos_scenario_walks_the_plan_rounds() -> None:
    text = user_message("c001p002", "L1E1.L1")
    planned = rounds("c001p002", "L1E1.L1")
    messages = [Message(role="user", content=text)]
    turns = []
    for _ in range(3):
        turn = chaos_scenario(Conversation("chaos-bot", "chat", list(messages)))
        turns.append(turn)
        if "content" in turn:
            break
        calls = [
            ToolCall(f"id{len(messages)}-{n}", c["name"], "{}")
            for n, c in enumerate(turn["tool_calls"])
        ]
        messages.append(Message(role="assistant", tool_calls=calls))
        messages.extend(Message(role="tool", content="x", tool_call_id=c.id) for c in calls)
    assert [[c["arguments"]["tag"] for c in t["tool_calls"]] for t in turns[:2]] == [
        [c.tag for c in r] for r in planned
    ]
    assert turns[2] == {"content": final_answer("c001p002", "L1E1.L1")}


def _collected(
    executions: int, reply: bool, plan: str = "L1", output: str | None = None
) -> Collected:
    chat = {
        "id": "c",
        "strict": True,
        "posts": [{"requestId": "p0", "tag": "t0", "plan": plan, "mode": "none"}],
    }
    [[call]] = rounds("t0", plan)
    run_id = "run-1"
    rows: dict[str, dict[str, Any]] = {
        "state": {"RowKey": "state", "ActiveRunId": ""},
        "run-1": {"RowKey": "run-1", "RunId": run_id, "RequestId": "p0", "Status": "completed"},
        "msg-0001": {"RowKey": "msg-0001", "Role": "System", "Content": "s"},
        "msg-0002": {
            "RowKey": "msg-0002",
            "Role": "User",
            "Content": user_message("t0", plan),
            "RunId": run_id,
        },
        "msg-0003": {
            "RowKey": "msg-0003",
            "Role": "Assistant",
            "Content": "",
            "RunId": run_id,
            "ToolCalls": json.dumps(
                [{"id": "k", "functionArguments": json.dumps(call.arguments())}]
            ),
        },
        "msg-0004": {
            "RowKey": "msg-0004",
            "Role": "Tool",
            "Content": call.output if output is None else output,
            "Name": "k",
            "RunId": run_id,
        },
        "msg-0005": {
            "RowKey": "msg-0005",
            "Role": "Assistant",
            "RunId": run_id,
            "Content": final_answer("t0", plan),
        },
    }
    journal: list[dict[str, Any]] = [
        {"kind": "send", "what": "post", "chat": "c", "requestId": "p0"}
    ]
    if reply:
        body = {"type": "assistantReply", "requestId": "p0", "status": "completed"}
        journal.append({"kind": "event", "body": body})
    return Collected(
        plan={"chats": [chat]},
        rows={"c": rows},
        journal=journal,
        leftover_events=[],
        tool_log=[{"event": "end", "tag": call.tag}] * executions,
        dead_letters=[],
        worker_events=Counter(),
        faults=[],
        model_calls=0,
        kills=0,
        outage_seconds=0,
        wall_seconds=0,
    )


def test_the_audit_passes_a_good_chat_and_names_what_failed() -> None:
    assert not failed(audit(_collected(executions=1, reply=True)))
    lines = {line.name: line for line in audit(_collected(executions=2, reply=False))}
    assert lines["tool executions per call = 1 (0 if interrupted)"].ok is False
    [failure] = lines["tool executions per call = 1 (0 if interrupted)"].failures
    assert failure.startswith("c t0.r0.l0: executed 2 times (started 0), results stored 1")
    assert lines["final replies received"].ok is False
    assert lines["completed"].ok is True


def test_the_audit_holds_mcp_calls_to_at_most_once() -> None:
    """An MCP call ran once, or never while its server was down (answered unavailable): both
    pass; run twice, or neither run nor answered for a reason: a failure, on its own line."""
    mcp_line = "MCP calls run at most once (server killed once)"
    down = "error: MCP server 'remote' is unavailable: ConnectError: All connection attempts failed"
    assert not failed(audit(_collected(executions=1, reply=True, plan="M1")))
    lines = {line.name: line for line in audit(_collected(0, True, plan="M1", output=down))}
    assert not failed(list(lines.values()))
    assert lines[mcp_line].value.startswith("0 of 1 once; 1 answered 'unavailable'")
    lines = {line.name: line for line in audit(_collected(executions=2, reply=True, plan="M1"))}
    assert lines[mcp_line].ok is False
    lines = {line.name: line for line in audit(_collected(0, True, plan="M1", output="error: x"))}
    assert lines[mcp_line].ok is False


def _approval_chat(tag: str, verdict: str, content: str, executions: int) -> Collected:
    """A chat whose one post made one call that waited for a decision (plan ``A1``)."""
    [[call]] = rounds(tag, "A1")
    run_id = "run-1"
    chat = {
        "id": "c",
        "strict": True,
        "posts": [
            {"requestId": "p0", "tag": tag, "plan": "A1", "mode": "none", "approval_mode": "whole"}
        ],
    }
    rows: dict[str, dict[str, Any]] = {
        "state": {"RowKey": "state", "ActiveRunId": ""},
        "run-1": {"RowKey": "run-1", "RunId": run_id, "RequestId": "p0", "Status": "completed"},
        "msg-0001": {
            "RowKey": "msg-0001",
            "Role": "User",
            "Content": user_message(tag, "A1"),
            "RunId": run_id,
        },
        "msg-0002": {
            "RowKey": "msg-0002",
            "Role": "Assistant",
            "Content": "",
            "RunId": run_id,
            "ToolCalls": json.dumps(
                [{"id": "k", "functionArguments": json.dumps(call.arguments())}]
            ),
        },
        "msg-0003": {
            "RowKey": "msg-0003",
            "Role": "Tool",
            "Content": content,
            "Name": "k",
            "RunId": run_id,
            "Approval": verdict,
            "ApprovalBy": "chaos-a",
        },
        "msg-0004": {
            "RowKey": "msg-0004",
            "Role": "Assistant",
            "RunId": run_id,
            "Content": final_answer(tag, "A1"),
        },
    }
    body = {"type": "assistantReply", "requestId": "p0", "status": "completed"}
    return Collected(
        plan={"chats": [chat]},
        rows={"c": rows},
        journal=[
            {"kind": "send", "what": "post", "chat": "c", "requestId": "p0"},
            {"kind": "event", "body": body},
        ],
        leftover_events=[],
        tool_log=[
            {"event": e, "tag": call.tag} for _ in range(executions) for e in ("start", "end")
        ],
        dead_letters=[],
        worker_events=Counter(),
        faults=[],
        model_calls=0,
        kills=0,
        outage_seconds=0,
        wall_seconds=0,
    )


def test_the_audit_counts_approved_calls_once_and_denied_never() -> None:
    """An approved call executed once passes, twice fails; a denied call that never ran
    passes, one that ran fails; a decision the producer did not make fails."""
    [[yes]] = rounds("t1", "A1")
    [[no]] = rounds("t2", "A1")
    assert approves("t1") and not approves("t2"), "the seeded decisions of these tags"

    def lines(collected: Collected) -> dict[str, Any]:
        return {line.name: line for line in audit(collected)}

    assert not failed(audit(_approval_chat("t1", "approved", yes.output, 1)))
    assert not failed(audit(_approval_chat("t2", "denied", no.denied_output, 0)))
    twice = lines(_approval_chat("t1", "approved", yes.output, 2))
    assert twice["approved calls run exactly once"].ok is False
    # A kill once the call was marked started: answered "interrupted", not run again (at most
    # once); an output stored for a call that never ran is a failure.
    cut = f"error: the call to chaos_approve {INTERRUPTED} (the worker running it stopped)"
    assert not failed(audit(_approval_chat("t1", "approved", cut, 0)))
    lost = lines(_approval_chat("t1", "approved", yes.output, 0))
    assert lost["approved calls run exactly once"].ok is False
    ran = lines(_approval_chat("t2", "denied", no.denied_output, 1))
    assert ran["denied calls never run"].ok is False
    other = lines(_approval_chat("t2", "approved", no.output, 1))
    assert other["decisions kept with their calls"].ok is False
