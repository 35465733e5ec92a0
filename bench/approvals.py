"""Storage requests of an approval round: the same one-call round with and without approval.

One ``assistant-worker run`` process with its default settings, the ``chat`` backend, the
instant fake model (it asks for one call, then answers with its result), on Azurite started
with ``--debug``, counted as ``bench.requests_per_run`` counts: the worker's requests between
two marks in Azurite's log. Each case has a chat of its own: without approval (the call runs at
once) and with ``approvalRequired`` naming the tool (the run parks, the benchmark's producer
reads ``toolApprovalRequired`` from its reply queue and approves the call through the requests
queue at once). Receives that returned nothing are idle polling (the approval round waits for
its producer in between; how many depends on how fast the producer answers): they are shown
apart and not counted, in either column.

Two tools: ``send_email``, which must not run twice, and ``lookup_order``, declared
``@tool(idempotent=True)`` (``bench.approval_tools``).

Run: ``python -m bench.approvals`` (``--runs 3``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO_ROOT, Report, quiet_logs, table
from bench.harness import Producer, WorkerProcess, wait_created, worker_env
from bench.requests import RequestLog, StorageRequest, by_kind, by_operation, kinds_table
from bench.requests_per_run import trace
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI
from worker.testing.fake_openai_brain import Conversation, Turn

TARGET = 4
MODEL = "approval-bench"
TOOLS = ("send_email", "lookup_order")


def one_call(conversation: Conversation) -> Turn:
    """The fake model: one call of the tool the user message names, then an answer."""
    if conversation.tool_results():
        return {"content": "done"}
    if conversation.last_user_text().startswith("lookup_order"):
        return {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": 7}}]}
    arguments = {"to": "bo@example.com", "subject": "lunch"}
    return {"tool_calls": [{"name": "send_email", "arguments": arguments}]}


def busy(requests: list[StorageRequest]) -> tuple[list[StorageRequest], int]:
    """The requests that did something, and how many receives returned nothing."""
    kept = [r for r in requests if not (r.operation == "Messages_Dequeue" and r.items == 0)]
    return kept, len(requests) - len(kept)


@dataclass
class Case:
    """Sums over the measured rounds of one case (means by ``mean``)."""

    kinds: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    idle: float = 0.0
    seconds: float = 0.0
    last: list[StorageRequest] = field(default_factory=list)

    def add(self, requests: list[StorageRequest], idle: int, seconds: float) -> None:
        self.kinds += by_kind(requests)
        self.operations += by_operation(requests)
        self.idle += idle
        self.seconds += seconds
        self.last = requests

    def mean(self, runs: int) -> Case:
        return Case(
            Counter({k: v / runs for k, v in self.kinds.items()}),
            Counter({k: v / runs for k, v in self.operations.items()}),
            self.idle / runs,
            self.seconds / runs,
            self.last,
        )

    @property
    def total(self) -> float:
        return sum(self.kinds.values())


async def _round(
    producer: Producer, log: RequestLog, chat_id: str, tool: str, approve: bool
) -> tuple[list[StorageRequest], int, float]:
    """One post through its reply; with ``approve``, the producer approves its call."""
    await asyncio.sleep(0.5)  # the previous round's acknowledgements
    start = await log.amark()
    began = time.perf_counter()
    request_id, _sent = await producer.post(chat_id, f"{tool} please")
    if approve:
        event = await producer.event("toolApprovalRequired", 60, requestId=request_id)
        [call] = event["toolCalls"]
        decision = {"toolCallId": call["id"], "approve": True, "by": "bench"}
        await producer.send({"type": "submitToolApprovals", "id": chat_id,
                             "runId": event["runId"], "approvals": [decision]})  # fmt: skip
    reply = await producer.reply(request_id, within=60)
    assert reply.event.get("status") == "completed", reply.event
    seconds = time.perf_counter() - began
    await asyncio.sleep(1.0)  # its last acknowledgements
    end = await log.amark()
    requests, idle = busy(log.worker_requests(start, end))
    return requests, idle, seconds


def case_name(tool: str, approve: bool) -> str:
    return f"{tool} + approval" if approve else tool


async def _measure(
    azurite: Azurite, log: RequestLog, fake: FakeOpenAI, folder: Path, runs: int
) -> dict[str, Case]:
    suffix = uuid.uuid4().hex[:8]
    env = worker_env(
        azurite.connection_string,
        suffix,
        base_url=fake.base_url,
        model=MODEL,
        tools="bench.approval_tools",
        # The console script does not put the work tree on the path: the tools module is here.
        PYTHONPATH=str(REPO_ROOT),
    )
    cases = {case_name(tool, approve): Case() for tool in TOOLS for approve in (False, True)}
    with WorkerProcess(env, folder / "worker.log") as worker:
        async with Producer(azurite.connection_string, worker.requests_queue) as producer:
            chats = {}
            for tool in TOOLS:
                for approve in (False, True):
                    chat_id = f"{tool.replace('_', '-')}-{'yes' if approve else 'no'}-{suffix}"
                    fields = {"approvalRequired": [tool]} if approve else {}
                    await producer.create(chat_id, **fields)
                    chats[case_name(tool, approve)] = (chat_id, tool, approve)
            await wait_created(azurite.connection_string, [c for c, _, _ in chats.values()])
            # A warm-up round per chat: the first post of a process reads what later ones find
            # in its caches.
            for chat_id, tool, approve in chats.values():
                await _round(producer, log, chat_id, tool, approve)
            for _ in range(runs):
                for name, (chat_id, tool, approve) in chats.items():
                    cases[name].add(*await _round(producer, log, chat_id, tool, approve))
    return {name: case.mean(runs) for name, case in cases.items()}


def measure(runs: int = 2) -> Report:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-approvals-") as tmp:
        folder = Path(tmp)
        log_path = folder / "azurite-debug.log"
        with Azurite(debug_log=log_path) as azurite, FakeOpenAI().running_in_thread() as fake:
            fake.set_default(one_call)
            log = RequestLog(log_path, azurite)
            results = asyncio.run(_measure(azurite, log, fake, folder, runs))
    names = list(results)
    out = Report("Storage requests of an approval round (issue 16)")
    out.add(
        "One `assistant-worker run` process, default settings, `chat` backend, instant fake "
        f"model: a post whose model asks for one call, then answers; mean of {runs} rounds per "
        "case after one warm-up round, counted from Azurite's `--debug` log as "
        "`bench.requests_per_run` counts (the worker's requests between two marks), without "
        "the receives that returned nothing (idle polling: the approval round waits for its "
        f"producer in between). Target: an approval round costs at most {TARGET} requests more "
        "than the same round without approval."
    )
    out.add(
        "Where the approval round's extra requests go: the `toolApprovalRequired` event, the "
        "decision's receive, its commit (the decisions, with the approved call's claim) and its "
        "delete. An approved call of a tool that must not run twice (`send_email`) is claimed "
        "as it starts (`Table_MergeEntity`, so that a worker killed between the decision and "
        "the call leaves it to run once), and its output then goes with the round's commit "
        "instead of before it (`Table_UpdateEntity`). The decision is applied here by the "
        "process that parked the run, which has the run as its last commit left it; on another "
        "replica it reads the chat's state and run rows first (2 requests more)."
    )
    out.add(
        kinds_table(
            {n: Counter({k: round(v, 1) for k, v in results[n].kinds.items()}) for n in names}
        )
    )
    summary = []
    extras: dict[str, float] = {}
    for tool in TOOLS:
        plain, approved = results[case_name(tool, False)], results[case_name(tool, True)]
        extra = approved.total - plain.total
        extras[tool] = extra
        verdict = "yes" if extra <= TARGET else "no"
        summary.append((f"`{tool}`", plain.total, approved.total, extra, verdict))
    out.add(table(["round", "without approval", "with approval", "extra", f"<= {TARGET}"], summary))
    operations = sorted({op for case in results.values() for op in case.operations})
    out.add(
        "By Azurite operation:\n\n"
        + table(
            ["operation", *names],
            [(op, *(round(results[n].operations[op], 1) for n in names)) for op in operations],
        )
    )
    out.add(
        table(
            ["per round", *names],
            [
                ("idle empty receives (not counted)", *(results[n].idle for n in names)),
                ("post to reply, seconds", *(round(results[n].seconds, 2) for n in names)),
            ],
        )
    )
    for name in (case_name(TOOLS[0], False), case_name(TOOLS[0], True)):
        out.add(
            f"The worker's requests of the last `{name}` round, in order (ids elided; empty "
            "receives folded into the next request):\n\n```\n" + trace(results[name].last) + "\n```"
        )
    out.numbers = {
        "totals": {name: case.total for name, case in results.items()},
        "extra": extras,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2, help="measured rounds per case")
    args = parser.parse_args()
    print(measure(args.runs).markdown())


if __name__ == "__main__":
    main()
