"""The chaos soak's script: what each post asks for, and the fake model's answers to it.

A post's user message is ``chaos <tag> plan=<plan>``. The plan is a list of tool rounds
separated by ``.``; each round is made of ``L<n>`` (n quick local calls), ``S<n>`` (n slow local
calls), ``E<n>`` (n external calls), ``M<n>`` (n calls of the MCP server's ``chaos_remote``)
and ``A<n>`` (n local calls that wait for a decision: every chat names their tool in
``approvalRequired``), e.g. ``L2E1.M1``; an empty plan answers at once. The producer approves
or denies each ``A`` call (:func:`approves`: at random, seeded by its tag).
:func:`chaos_scenario` (the fake model's default scenario in the soak, loaded with
``--scenario-callable bench.chaos_model:chaos_scenario``) is stateless: it counts the tool
rounds the conversation already holds since the post and asks for the next round, or answers
:func:`final_answer`. Every call carries a tag of its own, so the audit can count each call's
executions and stored results even though tools never learn their call id.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from worker.testing.fake_openai_brain import Conversation, Turn

LOCAL_TOOL = "chaos_local"
EXTERNAL_TOOL = "chaos_external"
# The soak's MCP server (tests/support/mcp_server.py) by its name in WORKER_MCP_SERVERS, and
# its tool as the model calls it.
MCP_SERVER = "remote"
MCP_TOOL = f"{MCP_SERVER}__chaos_remote"
# A local tool whose calls wait for the producer's decision (not safe to run twice).
APPROVAL_TOOL = "chaos_approve"
SLOW_SECONDS = 2.0

_MESSAGE_RE = re.compile(r"^chaos (?P<tag>\S+) plan=(?P<plan>\S*)$")
_ROUND_RE = re.compile(r"([LSEMA])(\d+)")

# What the external tool is, as the create's function definition.
EXTERNAL_DEFINITION = {
    "type": "function",
    "function": {
        "name": EXTERNAL_TOOL,
        "description": "A tool answered by the soak's producer (submitToolOutputs).",
        "parameters": {
            "type": "object",
            "properties": {"tag": {"type": "string"}},
            "required": ["tag"],
        },
    },
}

# Plans and their weights; modes for the external calls are chosen separately.
PLANS: tuple[tuple[str, int], ...] = (
    ("", 15),
    ("L1", 25),
    ("L2", 15),
    ("L1.L1", 8),
    ("S1", 4),
    ("E1", 10),
    ("E2", 12),
    ("L1E1", 6),
    ("E1.L1", 5),
    ("M1", 8),
    ("L1M1", 5),
    ("M1.L1", 4),
    ("A1", 8),
    ("L1A1", 5),
    ("A2", 5),
    ("A1E1", 4),
    ("A1.L1", 3),
)
# How the producer answers a toolCallsRequired event (see bench.chaos_producer).
MODES_ONE = ("whole", "twice")
MODES_MANY = ("whole", "partial", "concurrent", "repeat", "twice")
# How it decides a toolApprovalRequired event: one request, the same sent twice, two approvers
# who disagree sending at once (the first decision stored stands), one request per call, one
# after another or all at once.
APPROVAL_MODES_ONE = ("whole", "twice", "conflict")
APPROVAL_MODES_MANY = ("whole", "twice", "conflict", "split", "concurrent")
# The share of the calls that wait for a decision that the producer approves.
APPROVE_SHARE = 0.6


@dataclass(frozen=True)
class Call:
    """One call a plan asks for."""

    tag: str
    kind: str  # "L", "S", "E", "M" or "A"

    @property
    def name(self) -> str:
        return {"E": EXTERNAL_TOOL, "M": MCP_TOOL, "A": APPROVAL_TOOL}.get(self.kind, LOCAL_TOOL)

    @property
    def mcp(self) -> bool:
        return self.kind == "M"

    @property
    def external(self) -> bool:
        return self.kind == "E"

    @property
    def approval(self) -> bool:
        return self.kind == "A"

    def arguments(self) -> dict[str, object]:
        if self.kind in ("E", "M", "A"):
            return {"tag": self.tag}
        return {"tag": self.tag, "seconds": SLOW_SECONDS if self.kind == "S" else 0.0}

    @property
    def output(self) -> str:
        """What its result says: the local or MCP tool's return value (an approved call's
        too), or the producer's output."""
        return f"{'ext' if self.external else 'ok'} {self.tag}"

    @property
    def denied_output(self) -> str:
        """The result of a call that waited for a decision and was denied."""
        return f"denied: {denial_reason(self.tag)}"


def approves(tag: str) -> bool:
    """The producer's decision on the call tagged ``tag`` (at random, the same every time)."""
    return random.Random(f"approve {tag}").random() < APPROVE_SHARE


def denial_reason(tag: str) -> str:
    return f"chaos denies {tag}"


def user_message(tag: str, plan: str) -> str:
    return f"chaos {tag} plan={plan}"


def parse_message(text: str) -> tuple[str, str] | None:
    match = _MESSAGE_RE.match(text.strip())
    return (match["tag"], match["plan"]) if match else None


def rounds(tag: str, plan: str) -> list[list[Call]]:
    """The calls of each round of a plan."""
    result: list[list[Call]] = []
    for number, text in enumerate(part for part in plan.split(".") if part):
        calls: list[Call] = []
        for kind, count in _ROUND_RE.findall(text):
            for _ in range(int(count)):
                calls.append(Call(f"{tag}.r{number}.{kind.lower()}{len(calls)}", kind))
        result.append(calls)
    return result


def final_answer(tag: str, plan: str) -> str:
    calls = sum(len(r) for r in rounds(tag, plan))
    return f"done {tag} after {len(rounds(tag, plan))} rounds and {calls} results"


def chaos_scenario(conversation: Conversation) -> Turn:
    """The fake model's answer: the plan's next round, else the final answer."""
    parsed = parse_message(conversation.last_user_text())
    if parsed is None:
        return {"content": f"You said: {conversation.last_user_text()}"}
    tag, plan = parsed
    done = sum(1 for m in conversation.since_last_user() if m.role == "assistant" and m.tool_calls)
    planned = rounds(tag, plan)
    if done < len(planned) and conversation.tools_allowed:
        return {
            "tool_calls": [
                {"name": call.name, "arguments": call.arguments()} for call in planned[done]
            ]
        }
    return {"content": final_answer(tag, plan)}


def pick_approval_mode(rng: random.Random, plan: str) -> str:
    """How the producer decides the calls of a plan that wait for approval."""
    most = max((len([c for c in r if c.approval]) for r in rounds("x", plan)), default=0)
    if most == 0:
        return "none"
    return rng.choice(APPROVAL_MODES_MANY if most > 1 else APPROVAL_MODES_ONE)


def pick_plan(rng: random.Random) -> tuple[str, str]:
    """A plan and the producer's mode for its external calls."""
    plans = [plan for plan, _ in PLANS]
    weights = [weight for _, weight in PLANS]
    plan = rng.choices(plans, weights)[0]
    externals = max((len([c for c in r if c.external]) for r in rounds("x", plan)), default=0)
    if externals == 0:
        return plan, "none"
    return plan, rng.choice(MODES_MANY if externals > 1 else MODES_ONE)
