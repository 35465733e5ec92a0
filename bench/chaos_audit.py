"""The chaos soak's audit: every chat read back, checked against what the producer sent.

Pure functions over what :mod:`bench.chaos` collected after the soak (the chat table's rows,
the producer's journal, the tool log, the dead letters, the worker logs); :func:`audit`
returns the table's lines, each with the chats that failed it.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.chaos_model import Call, approves, final_answer, rounds, user_message
from worker.client.stream import DeltaAssembler

# What the worker stores for a tool call whose worker died while running it (at most once).
INTERRUPTED = "was interrupted"
# What it stores for an MCP call its server could not take (down, or killed mid-call).
MCP_FAILED = ("is unavailable", "timed out after")
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired", "incomplete"})
MAX_SHOWN = 12


@dataclass
class Line:
    """One line of the audit table."""

    name: str
    value: str
    expected: str
    ok: bool | None  # None: information only
    failures: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "FAIL")


@dataclass
class Collected:
    """Everything the audit reads."""

    plan: Mapping[str, Any]  # the producer's config (chats, posts, modes)
    rows: Mapping[str, Mapping[str, Mapping[str, Any]]]  # PartitionKey -> RowKey -> entity
    journal: Sequence[Mapping[str, Any]]
    leftover_events: Sequence[Mapping[str, Any]]  # reply events still on the queues
    tool_log: Sequence[Mapping[str, Any]]
    dead_letters: Sequence[Mapping[str, Any]]
    worker_events: Counter[str]
    faults: Sequence[Mapping[str, Any]]
    model_calls: int
    kills: int
    outage_seconds: float
    wall_seconds: float
    reads_failed: list[str] = field(default_factory=list)
    queue_depths: Mapping[str, int] = field(default_factory=dict)
    # requestId -> what delayed it, from the worker logs: "create wait", "outage", "redelivered"
    delays: Mapping[str, frozenset[str]] = field(default_factory=dict)
    killed: Mapping[int, float] = field(default_factory=dict)  # worker pid -> SIGKILL time
    mcp_down_seconds: float = 0.0  # how long the MCP server was down
    token_leaks: int = 0  # worker log lines holding the MCP server's token
    # What the fake's webhooks came to (events, dropped, duplicated, delivered, retried, lost);
    # empty when the soak ran without webhooks.
    webhooks: Mapping[str, int] = field(default_factory=dict)


def join_text(entity: Mapping[str, Any], name: str) -> str:
    first = entity.get(name) or ""
    parts = int(entity.get(f"{name}Parts") or 1)
    return str(first) + "".join(str(entity.get(f"{name}Part{n}", "")) for n in range(2, parts + 1))


def tool_calls_of(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    text = join_text(row, "ToolCalls")
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def history_problems(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """An assistant tool-call message not followed by one result per call, or a stray result."""
    problems: list[str] = []
    i = 0
    while i < len(messages):
        row = messages[i]
        key = row["RowKey"]
        if row.get("Role") == "Tool":
            problems.append(f"{key}: tool result {row.get('Name')!r} answers no open call")
            i += 1
            continue
        wanted = (
            [str(c.get("id")) for c in tool_calls_of(row)] if row.get("Role") == "Assistant" else []
        )
        i += 1
        answered: list[str] = []
        while i < len(messages) and messages[i].get("Role") == "Tool":
            answered.append(str(messages[i].get("Name")))
            i += 1
        if sorted(answered) != sorted(wanted):
            problems.append(f"{key}: calls {wanted} answered by {answered}")
    return problems


def inversions(order: Sequence[int]) -> int:
    return sum(
        1 for i in range(len(order)) for j in range(i + 1, len(order)) if order[i] > order[j]
    )


def audit(data: Collected) -> list[Line]:
    chats = {chat["id"]: chat for chat in data.plan["chats"]}
    posts_planned = sum(len(chat["posts"]) for chat in chats.values())

    # -- what the producer did ----------------------------------------------------------
    sent_posts: dict[str, list[str]] = defaultdict(list)  # chat -> requestIds in send order
    sends = Counter[str]()
    for entry in data.journal:
        if entry.get("kind") == "send":
            sends[str(entry.get("what"))] += 1
            if entry.get("what") == "post":
                sent_posts[str(entry.get("chat"))].append(str(entry.get("requestId")))
    events = [
        e["body"]
        for e in data.journal
        if e.get("kind") == "event" and isinstance(e.get("body"), dict)
    ]
    events.extend(data.leftover_events)
    replies: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    required = 0
    for event in events:
        if event.get("type") == "assistantReply":
            replies[str(event.get("requestId"))].append(event)
        elif event.get("type") == "toolCallsRequired":
            required += 1
    answers = [e for e in data.journal if e.get("kind") == "answer"]
    decided_events = [e for e in data.journal if e.get("kind") == "decide"]
    # The approval mode each post's decisions were sent in (a conflict may stand either way).
    approval_modes = {
        post["tag"]: post.get("approval_mode", "none")
        for chat in chats.values()
        for post in chat["posts"]
    }
    approval_events = sum(1 for e in events if e.get("type") == "toolApprovalRequired")

    ends = Counter(str(e.get("tag")) for e in data.tool_log if e.get("event") == "end")
    by_tag: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in data.tool_log:
        by_tag[str(entry.get("tag"))].append(entry)

    def rerun_after_kill(tag: str) -> bool:
        """Whether every execution but the last ended in a worker SIGKILLed before the next
        execution began (its result was never stored: a crash re-run, not a race)."""
        entries = sorted(by_tag.get(tag, []), key=lambda e: float(e.get("t") or 0))
        finished = [e for e in entries if e.get("event") == "end"]
        for earlier, later in itertools.pairwise(finished):
            killed_at = data.killed.get(int(earlier.get("pid") or 0))
            ended, next_end = float(earlier.get("t") or 0), float(later.get("t") or 0)
            if killed_at is None or not ended <= killed_at <= next_end:
                return False
        return True

    def executions_detail(tag: str) -> str:
        """Who ran a call more than once, and whether the first one was killed right after."""
        entries = sorted(by_tag.get(tag, []), key=lambda e: float(e.get("t") or 0))
        parts = []
        first_t = float(entries[0].get("t") or 0) if entries else 0.0
        for entry in entries:
            if entry.get("event") != "end":
                continue
            pid = int(entry.get("pid") or 0)
            ended = float(entry.get("t") or 0)
            killed_at = data.killed.get(pid)
            fate = (
                f", SIGKILLed {killed_at - ended:.2f} s later"
                if killed_at is not None and killed_at >= ended
                else ""
            )
            parts.append(f"pid {pid} at +{ended - first_t:.1f} s{fate}")
        return f": {'; '.join(parts)}" if parts else ""

    starts = Counter(str(e.get("tag")) for e in data.tool_log if e.get("event") == "start")

    # -- per chat -----------------------------------------------------------------------
    fail: dict[str, list[str]] = defaultdict(list)
    mcp_fail: list[str] = []
    totals = Counter[str]()

    def audit_approval(call: Call, rows: Sequence[Mapping[str, Any]], chat_id: str) -> None:
        """A call that waited for a decision: approved, it ran exactly once (started once;
        a kill once it was marked started leaves it answered "interrupted", never run again,
        like a local call); denied, it
        never ran and its result says so. Its one result keeps the decision that stood, which
        is the producer's (either of the two in a conflict)."""
        totals["approval_calls"] += 1
        started, finished = starts.get(call.tag, 0), ends.get(call.tag, 0)
        texts = [join_text(row, "Content") for row in rows]
        where = f"{chat_id} {call.tag}"
        if len(rows) != 1:
            fail["history"].append(f"{where}: results stored {[t[:60] for t in texts]}")
            return
        [row], [text] = rows, texts
        verdict = row.get("Approval")
        conflict = approval_modes.get(call.tag.split(".r")[0]) == "conflict"
        if verdict not in ("approved", "denied"):
            fail["approvals"].append(f"{where}: no decision kept with its result {text[:80]!r}")
            return
        if not conflict and (verdict == "approved") != approves(call.tag):
            fail["approvals"].append(f"{where}: {verdict}, but the producer decided otherwise")
        if conflict:
            totals["approval_conflicts"] += 1
        if verdict == "approved":
            totals["approved"] += 1
            interrupted = INTERRUPTED in text
            # At most once, as for local calls: a kill after the call was marked started and
            # before it ran (the tool had not logged its start) is answered "interrupted" too.
            ran_once = started == 1 and finished <= 1 and text == call.output
            if ran_once or (interrupted and started <= 1 and finished <= 1):
                totals["approved_once"] += 1
                totals["approved_interrupted"] += int(interrupted)
            else:
                fail["approved"].append(
                    f"{where}: approved, executed {finished} times (started {started}), "
                    f"result {text[:60]!r}{executions_detail(call.tag)}"
                )
        else:
            totals["denied"] += 1
            if started == 0 and text.startswith("denied: "):
                totals["denied_never"] += 1
            else:
                fail["denied"].append(
                    f"{where}: denied, started {started} times, result {text[:60]!r}"
                )

    order_info: list[str] = []
    inversion_causes = Counter[str]()
    orphan_claims: list[str] = []
    for chat_id, chat in chats.items():
        partition = data.rows.get(chat_id, {})
        messages = [partition[k] for k in sorted(partition) if k.startswith("msg-")]
        runs = [row for key, row in partition.items() if key.startswith("run-")]
        state = partition.get("state", {})
        runs_by_request: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for row in runs:
            runs_by_request[str(row.get("RequestId"))].append(row)
        sent = set(sent_posts.get(chat_id, []))
        tools_by_content = Counter(
            join_text(m, "Content") for m in messages if m.get("Role") == "Tool"
        )
        users = [join_text(m, "Content") for m in messages if m.get("Role") == "User"]
        # Each call's results by its tag (the tag is in the call's arguments; a result names
        # its call id): an interrupted call's result is an error without the tag.
        id_to_tag: dict[str, str] = {}
        for m in messages:
            for tool_call in tool_calls_of(m):
                try:
                    arguments = json.loads(str(tool_call.get("functionArguments") or "{}"))
                except ValueError:
                    continue
                if isinstance(arguments, dict) and "tag" in arguments:
                    id_to_tag[str(tool_call.get("id"))] = str(arguments["tag"])
        tag_results: dict[str, list[str]] = defaultdict(list)
        tag_rows: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for m in messages:
            if m.get("Role") == "Tool" and str(m.get("Name")) in id_to_tag:
                tag_results[id_to_tag[str(m.get("Name"))]].append(join_text(m, "Content"))
                tag_rows[id_to_tag[str(m.get("Name"))]].append(m)
        user_counts = Counter(users)
        if not state:
            fail["chat exists"].append(f"{chat_id}: no state row")
        for post in chat["posts"]:
            request_id = post["requestId"]
            if request_id not in sent:
                continue
            tag, plan = post["tag"], post["plan"]
            totals["posts"] += 1
            matching = runs_by_request.get(request_id, [])
            totals["runs"] += len(matching)
            if len(matching) != 1:
                fail["runs"].append(f"{chat_id} {request_id}: {len(matching)} runs")
            run = matching[0] if matching else None
            status = str(run.get("Status")) if run else "-"
            if status == "completed":
                totals["completed"] += 1
            else:
                error = str(run.get("Error") or "")[:160] if run else ""
                fail["completed"].append(f"{chat_id} {request_id}: {status} {error}".rstrip())
            if run is not None and status not in TERMINAL:
                fail["active"].append(
                    f"{chat_id} {run.get('RunId')}: {status} phase={run.get('Phase')} "
                    f"step={run.get('Step')}"
                )
            text = user_message(tag, plan)
            stored = user_counts.get(text, 0)
            if stored == 1:
                totals["users_once"] += 1
            else:
                fail["users"].append(f"{chat_id} {request_id}: user message stored {stored} times")
            if run is not None and status == "completed":
                mine = [m for m in messages if m.get("RunId") == run.get("RunId")]
                last = mine[-1] if mine else None
                content = join_text(last, "Content") if last else ""
                if content == final_answer(tag, plan) and last and last.get("Role") == "Assistant":
                    totals["answers"] += 1
                else:
                    fail["answers"].append(f"{chat_id} {request_id}: last message {content[:80]!r}")
            else:
                # Not completed: counted once, under "completed".
                pass
            replied = replies.get(request_id, [])
            terminal = [r for r in replied if r.get("status") in TERMINAL]
            if terminal:
                totals["replied"] += 1
            else:
                fail["replies"].append(f"{chat_id} {request_id}: no final reply")
            if len(terminal) > 1:
                totals["duplicate_replies"] += len(terminal) - 1
            for call_round in rounds(tag, plan):
                for call in call_round:
                    stored_results = tools_by_content.get(call.output, 0)
                    if call.external:
                        totals["external"] += 1
                        if stored_results == 1:
                            totals["external_ok"] += 1
                        else:
                            fail["external"].append(
                                f"{chat_id} {call.tag}: output stored {stored_results} times"
                            )
                        continue
                    if call.approval:
                        audit_approval(call, tag_rows.get(call.tag, []), chat_id)
                        continue
                    totals["local"] += 1
                    totals["mcp"] += call.mcp
                    started, finished = starts.get(call.tag, 0), ends.get(call.tag, 0)
                    results = tag_results.get(call.tag, [])
                    interrupted = [r for r in results if INTERRUPTED in r]
                    unavailable = [
                        r for r in results if call.mcp and any(m in r for m in MCP_FAILED)
                    ]
                    failures_before = len(fail["executions"])
                    if started > 1 or finished > 1:
                        totals["local_twice"] += 1
                        if rerun_after_kill(call.tag):
                            totals["local_rerun_after_kill"] += 1
                        fail["executions"].append(
                            f"{chat_id} {call.tag}: executed {finished} times (started "
                            f"{started}), results stored {len(results)}"
                            f"{executions_detail(call.tag)}"
                        )
                    elif finished == 1:
                        totals["local_once"] += 1
                        totals["mcp_once"] += call.mcp
                    elif interrupted:
                        # At most once: the worker running it died; not run again, answered
                        # with an error that says so.
                        totals["local_interrupted"] += 1
                        totals["mcp_interrupted"] += call.mcp
                    elif unavailable:
                        # An MCP call while its server was down: the model was told, the call
                        # never ran (or died with the server), and it was not sent again.
                        totals["mcp_unavailable"] += 1
                    else:
                        fail["executions"].append(
                            f"{chat_id} {call.tag}: never executed (started {started}) and "
                            f"no interruption recorded; results {[r[:60] for r in results]}"
                        )
                    if started > finished:
                        totals["interrupted"] += started - finished
                    if finished == 1 and results and results[0] != call.output:
                        totals["result_lost"] += 1
                    good = len(results) == 1 and (
                        results[0] == call.output or bool(interrupted) or bool(unavailable)
                    )
                    if not good:
                        fail["history"].append(
                            f"{chat_id} {call.tag}: local results stored "
                            f"{[r[:60] for r in results]}"
                        )
                    if call.mcp:
                        mcp_fail.extend(fail["executions"][failures_before:])
        expected_requests = {p["requestId"] for p in chat["posts"]}
        for request_id, extra in runs_by_request.items():
            if request_id not in expected_requests:
                fail["runs"].append(
                    f"{chat_id}: {len(extra)} run(s) for unknown request {request_id}"
                )
        for text, count in user_counts.items():
            if count and not any(user_message(p["tag"], p["plan"]) == text for p in chat["posts"]):
                fail["users"].append(f"{chat_id}: unexpected user message {text[:60]!r}")
        terminal_runs = {str(r.get("RunId")) for r in runs if r.get("Status") in TERMINAL}
        for key, row in partition.items():
            # Claim rows (tool results, model claims) are removed when their step is stored;
            # one left by a finished run was written again by a copy of the step that ran
            # after that commit (see "tool executions per call").
            if key.startswith(("tool-", "claim-")) and str(row.get("RunId")) in terminal_runs:
                totals["orphan_claims"] += 1
                orphan_claims.append(f"{chat_id} {key} (run {row.get('RunId')})")
        if state and state.get("ActiveRunId"):
            fail["active"].append(f"{chat_id}: state.ActiveRunId={state.get('ActiveRunId')}")
        for problem in history_problems(messages):
            fail["history"].append(f"{chat_id} {problem}")
        # Order: the user messages as stored, against the order their posts were sent.
        position = {
            user_message(p["tag"], p["plan"]): n
            for n, p in enumerate(chat["posts"])
            if p["requestId"] in sent
        }
        send_rank = {rid: n for n, rid in enumerate(sent_posts.get(chat_id, []))}
        by_text = {user_message(p["tag"], p["plan"]): p["requestId"] for p in chat["posts"]}
        order = [send_rank[by_text[u]] for u in users if u in position and by_text[u] in send_rank]
        swapped = inversions(order)
        sent_order = sent_posts.get(chat_id, [])
        for i, a in enumerate(order):
            for b in order[i + 1 :]:
                if a > b:  # the post sent earlier (b) was applied later
                    causes = data.delays.get(sent_order[b], frozenset()) or {"none"}
                    for cause in causes:
                        inversion_causes[cause] += 1
        if chat["strict"]:
            totals["strict_chats"] += 1
            if order == sorted(order) and len(order) == len(sent):
                totals["strict_ok"] += 1
            else:
                fail["order"].append(
                    f"{chat_id}: user messages stored in send order {order} "
                    f"({len(sent)} posts sent)"
                )
        elif swapped:
            totals["burst_inversions"] += swapped
            order_info.append(f"{chat_id}: {swapped} inversions")

    stream_lines = streamed_runs(chats, data, events, sent_posts)

    # -- dead letters ---------------------------------------------------------------------
    letters = []
    for letter in data.dead_letters:
        info = letter.get("deadLetter") or {}
        message = letter.get("message")
        body = message if isinstance(message, dict) else {}
        letters.append(
            f"{info.get('queue')} {body.get('type', '?')} {body.get('id', '?')} "
            f"{body.get('requestId') or body.get('runId') or ''}: {info.get('errorType')}: "
            f"{str(info.get('reason'))[:200]}"
        )

    # -- the table ------------------------------------------------------------------------
    posts = totals["posts"]
    lines = [
        Line(
            "posts sent",
            f"{posts} (+{sends['create']} creates, {sends['submit'] + sends['submit-again']} "
            f"submits, {sum(v for k, v in sends.items() if k.startswith('decide'))} decisions)",
            f"{posts_planned}",
            posts == posts_planned,
            [
                f"{cid}: {len(sent_posts.get(cid, []))} of {len(c['posts'])} posts sent"
                for cid, c in chats.items()
                if len(sent_posts.get(cid, [])) != len(c["posts"])
            ],
        ),
        Line(
            "chats exist",
            f"{len(chats) - len(fail['chat exists'])}",
            f"{len(chats)}",
            not fail["chat exists"],
            fail["chat exists"],
        ),
        Line(
            "runs (one per post)", f"{totals['runs']}", f"{posts}", not fail["runs"], fail["runs"]
        ),
        Line(
            "completed",
            f"{totals['completed']}",
            f"{posts}",
            not fail["completed"],
            fail["completed"],
        ),
        Line(
            "final answers right",
            f"{totals['answers']}",
            f"{totals['completed']}",
            not fail["answers"],
            fail["answers"],
        ),
        Line(
            "final replies received",
            f"{totals['replied']} (+{totals['duplicate_replies']} dup)",
            f"{posts}",
            not fail["replies"],
            fail["replies"],
        ),
        Line(
            "user messages stored exactly once",
            f"{totals['users_once']}",
            f"{posts}",
            not fail["users"],
            fail["users"],
        ),
        Line(
            "tool executions per call = 1 (0 if interrupted)",
            f"{totals['local_once']} of {totals['local']} once; "
            f"{totals['local_interrupted']} interrupted by a kill and answered with an error, "
            f"not re-run; {totals['local_twice']} run twice "
            f"({totals['local_rerun_after_kill']} after their first worker was SIGKILLed "
            "before storing the result)",
            f"{totals['local']}",
            not fail["executions"],
            fail["executions"],
        ),
        Line(
            "MCP calls run at most once (server killed once)",
            f"{totals['mcp_once']} of {totals['mcp']} once; {totals['mcp_unavailable']} "
            f"answered 'unavailable' while the server was down ({data.mcp_down_seconds:.0f} s), "
            f"never sent again; {totals['mcp_interrupted']} interrupted by a kill",
            f"{totals['mcp']}",
            not mcp_fail,
            mcp_fail,
        ),
        Line(
            "MCP token in worker logs",
            f"{data.token_leaks} lines",
            "0",
            data.token_leaks == 0,
        ),
        Line(
            "external outputs applied once",
            f"{totals['external_ok']} of {totals['external']} ({required} events, "
            f"{len(answers)} answered)",
            f"{totals['external']}",
            not fail["external"],
            fail["external"],
        ),
        Line(
            "approved calls run exactly once",
            f"{totals['approved_once']} of {totals['approved']} "
            f"({totals['approved_interrupted']} interrupted by a kill, answered with an error, "
            "not re-run)",
            f"{totals['approved']}",
            not fail["approved"],
            fail["approved"],
        ),
        Line(
            "denied calls never run",
            f"{totals['denied_never']} of {totals['denied']}",
            f"{totals['denied']}",
            not fail["denied"],
            fail["denied"],
        ),
        Line(
            "decisions kept with their calls",
            f"{totals['approved'] + totals['denied']} of {totals['approval_calls']} "
            f"({approval_events} events, {len(decided_events)} decided, "
            f"{totals['approval_conflicts']} by two approvers at once; "
            f"{data.worker_events['approval.ignored']} later decisions ignored)",
            f"{totals['approval_calls']}",
            not fail["approvals"],
            fail["approvals"],
        ),
        Line(
            "history valid (calls answered once)",
            f"{len(fail['history'])} problems",
            "0",
            not fail["history"],
            fail["history"],
        ),
        Line(
            "runs still active", f"{len(fail['active'])}", "0", not fail["active"], fail["active"]
        ),
        Line("dead letters", f"{len(letters)}", "0", not letters, letters),
        Line(
            "order = post order (strict chats)",
            f"{totals['strict_ok']} of {totals['strict_chats']} chats",
            f"{totals['strict_chats']}",
            not fail["order"],
            fail["order"],
        ),
        Line(
            "order inversions (burst chats)",
            f"{totals['burst_inversions']} pairs; the earlier post was delayed by: "
            + (", ".join(f"{k} {v}" for k, v in sorted(inversion_causes.items())) or "-"),
            "-",
            None,
            order_info,
        ),
        Line(
            "tool executions interrupted",
            f"{totals['interrupted']} (finished but result lost: {totals['result_lost']})",
            "-",
            None,
        ),
        Line(
            "claim rows left by finished runs",
            f"{totals['orphan_claims']}",
            "-",
            None,
            orphan_claims,
        ),
    ]
    fired = Counter[str]()
    seen = 0
    for rule in data.faults:
        fired[str(rule.get("kind"))] += int(rule.get("fired") or 0)
        seen = max(seen, int(rule.get("seen") or 0))  # every rule counts every model call
    transient = 0
    for partition in data.rows.values():
        for key, row in partition.items():
            if key.startswith("run-"):
                transient += int(row.get("TransientFailures") or 0)
    ev = data.worker_events
    lines.append(
        Line(
            "retries",
            f"faults {sum(fired.values())} of {seen} model requests while on "
            f"({sum(fired.values()) / max(seen, 1):.0%}; {data.model_calls} model calls in all) "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(fired.items()))}); run transient "
            f"failures {transient}; message.retried {ev['message.retried']}; lease lost "
            f"{ev['message.lease_lost']}",
            "-",
            None,
        )
    )
    lines.append(
        Line(
            "chaos",
            f"{data.kills} kills, table down {data.outage_seconds:.0f} s, "
            f"storage.unavailable {ev['storage.unavailable']}",
            "-",
            None,
        )
    )
    lines.append(
        Line(
            "left on worker queues (delayed)",
            ", ".join(f"{name} {count}" for name, count in data.queue_depths.items()) or "-",
            "-",
            None,
        )
    )
    lines.extend(stream_lines)
    if data.webhooks:
        hooks = data.webhooks
        outcomes = {
            name.removeprefix("webhook:"): count
            for name, count in sorted(ev.items())
            if name.startswith("webhook:")
        }
        lines.append(
            Line(
                "webhooks",
                f"{hooks.get('events', 0)} events: {hooks.get('delivered', 0)} delivered "
                f"({hooks.get('retried', 0)} after a retry), {hooks.get('dropped', 0)} dropped, "
                f"{hooks.get('duplicated', 0)} duplicated, {hooks.get('lost', 0)} undelivered; "
                f"workers: {', '.join(f'{k} {v}' for k, v in outcomes.items()) or '-'}",
                "-",
                None,
            )
        )
        # A signed delivery refused means the route checks wrongly (the secret is right).
        rejected = ev["webhook.rejected"]
        lines.append(
            Line(
                "webhooks refused",
                f"{rejected}",
                "0",
                rejected == 0,
                []
                if not rejected
                else [f"{rejected} signed deliveries were refused (see webhook.rejected)"],
            )
        )
    lines.append(Line("wall time", f"{data.wall_seconds:.0f} s", "-", None))
    if data.reads_failed:
        lines.append(Line("audit reads", "failed", "ok", False, data.reads_failed))
    return lines


def streamed_runs(
    chats: Mapping[str, Mapping[str, Any]],
    data: Collected,
    events: Sequence[Mapping[str, Any]],
    sent_posts: Mapping[str, Sequence[str]],
) -> list[Line]:
    """The streamed chats' posts: each run completed, and its deltas, put together by the
    consumer rule (``worker.client.stream``), are exactly its reply's content, the stored
    answer; posts on the assistants API answer with the reply alone."""
    by_request: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for event in events:
        if event.get("type") == "assistantDelta":
            by_request[str(event.get("requestId"))].append(event)
    fail: dict[str, list[str]] = defaultdict(list)
    totals = Counter[str]()
    for chat_id, chat in chats.items():
        if not chat.get("stream"):
            continue
        partition = data.rows.get(chat_id, {})
        runs = {str(r.get("RequestId")): r for k, r in partition.items() if k.startswith("run-")}
        sent = set(sent_posts.get(chat_id, []))
        for post in chat["posts"]:
            request_id = post["requestId"]
            if request_id not in sent:
                continue
            run = runs.get(request_id)
            deltas = by_request.get(request_id, [])
            final = [
                e
                for e in events
                if e.get("type") == "assistantReply"
                and e.get("requestId") == request_id
                and e.get("status") in TERMINAL
            ]
            if chat["api"] == "assistants":
                totals["legacy"] += 1
                if deltas or any(r.get("deltaCount") is not None for r in final):
                    fail["legacy"].append(f"{chat_id} {request_id}: {len(deltas)} deltas")
                continue
            totals["posts"] += 1
            if run is not None and run.get("Status") == "completed":
                totals["completed"] += 1
            else:
                status = run.get("Status") if run is not None else "no run"
                fail["completed"].append(f"{chat_id} {request_id}: {status}")
                continue
            if not final:
                continue  # no reply: counted under "final replies received"
            reply = final[-1]
            assembled = DeltaAssembler()
            for delta in deltas:
                assembled.add(dict(delta))
            assembled.add(dict(reply))
            expected = final_answer(post["tag"], post["plan"])
            if assembled.complete and assembled.text() == reply.get("content") == expected:
                totals["assembled"] += 1
            else:
                fail["assembled"].append(
                    f"{chat_id} {request_id}: {assembled.held} of {reply.get('deltaCount')} "
                    f"deltas, {assembled.text()[:60]!r} vs {str(reply.get('content'))[:60]!r}"
                )
            totals["attempts"] += len({(d.get("step"), d.get("attempt")) for d in deltas})
            totals["deltas"] += len(deltas)
    return [
        Line(
            "streamed runs completed",
            f"{totals['completed']}",
            f"{totals['posts']}",
            not fail["completed"],
            fail["completed"],
        ),
        Line(
            "streamed: deltas assemble to the reply = the answer",
            f"{totals['assembled']} ({totals['deltas']} deltas, {totals['attempts']} tries)",
            f"{totals['completed']}",
            not fail["assembled"],
            fail["assembled"],
        ),
        Line(
            "stream on the assistants API: the reply alone",
            f"{totals['legacy'] - len(fail['legacy'])}",
            f"{totals['legacy']}",
            not fail["legacy"],
            fail["legacy"],
        ),
    ]


def render(lines: Sequence[Line]) -> str:
    """The audit table, then the failing chats of every failed line."""
    width = max(len(line.name) for line in lines)
    value_width = min(max(len(line.value) for line in lines), 70)
    out = [f"{'check':<{width}}  {'value':<{value_width}}  {'expected':>8}  result"]
    out.append("-" * len(out[0]))
    for line in lines:
        out.append(
            f"{line.name:<{width}}  {line.value:<{value_width}}  {line.expected:>8}  {line.result}"
        )
    for line in lines:
        if line.ok is False and line.failures:
            out.append("")
            out.append(f"FAILED {line.name}: {len(line.failures)}")
            out.extend(f"  {item}" for item in line.failures[:MAX_SHOWN])
            if len(line.failures) > MAX_SHOWN:
                out.append(f"  ... and {len(line.failures) - MAX_SHOWN} more")
    return "\n".join(out)


def failed(lines: Sequence[Line]) -> bool:
    return any(line.ok is False for line in lines)
