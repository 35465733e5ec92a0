"""Storage requests per run: the weather-bot turn on a short chat and on a long one.

The turn of the OpenAI Assistants function-calling sample (3 model calls, 2 tool rounds, the
``chat`` backend, the instant fake model, the tools of ``worker.devtools.weather``) through one
``assistant-worker run`` process with its default settings, on Azurite started with ``--debug``.
Each measured run is bounded by two marks in Azurite's log (``bench.requests``); the worker's
requests between them are counted by kind. Empty receives before the worker picked the post up
and after its last write are idle polling, not the run's: they are shown apart.

The long chat has ``--history`` earlier messages (posts answered by the echo model): if a
figure grows from the short column to the long one, a step reads (or a run scans) the history.

Run: ``python -m bench.requests_per_run`` (``--history 200 --runs 3``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Report, quiet_logs, table
from bench.harness import ECHO_MODEL, Producer, WorkerProcess, wait_created, worker_env
from bench.requests import (
    RequestLog,
    StorageRequest,
    by_kind,
    by_operation,
    entities_read,
    kinds_table,
)
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

ISSUE_FIGURE = 45  # measured on the main issue 7 started from
TARGET = 15


def run_span(requests: list[StorageRequest]) -> tuple[list[StorageRequest], int]:
    """The requests from the worker's first to its last that was not an empty receive, and
    how many empty receives fell outside (idle polling before pickup and after the run)."""
    busy = [
        i
        for i, r in enumerate(requests)
        if not (r.operation == "Messages_Dequeue" and r.items == 0)
    ]
    if not busy:
        return [], len(requests)
    span = requests[busy[0] : busy[-1] + 1]
    return span, len(requests) - len(span)


@dataclass
class Case:
    """Means per run over the measured runs of one chat."""

    kinds: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    idle: float = 0.0
    entities: float = 0.0
    model_calls: float = 0.0
    seconds: float = 0.0
    # The requests of the last measured run, in order (the trace below the tables).
    last: list[StorageRequest] = field(default_factory=list)

    def mean(self, runs: int) -> Case:
        return Case(
            Counter({k: v / runs for k, v in self.kinds.items()}),
            Counter({k: v / runs for k, v in self.operations.items()}),
            self.idle / runs,
            self.entities / runs,
            self.model_calls / runs,
            self.seconds / runs,
            self.last,
        )

    @property
    def total(self) -> float:
        return sum(self.kinds.values())


def trace(requests: list[StorageRequest]) -> str:
    """One line per request: operation, path shape, entities/messages returned."""
    lines: list[str] = []
    empty = 0
    for r in requests:
        if r.operation == "Messages_Dequeue" and r.items == 0:
            empty += 1
            continue
        path = re.sub(r"^https?://[^/]+/[^/]+", "", r.url)
        path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "ID", path)
        path = re.sub(r"popreceipt=[^&]+", "popreceipt=…", path)
        path = re.sub(r"(short|long)-[0-9a-f]{8}", "CHAT", path)
        path = re.sub(r"-[0-9a-f]{8}\b", "-…", path)
        path = urllib.parse.unquote(path)[:110]
        items = f"  -> {r.items}" if r.items is not None else ""
        skipped = f"  (+{empty} empty receives before)" if empty else ""
        lines.append(f"{r.operation or r.kind:<45} {path}{items}{skipped}")
        empty = 0
    return "\n".join(lines)


async def _measure(
    azurite: Azurite, log: RequestLog, fake: FakeOpenAI, folder: Path, history: int, runs: int
) -> dict[str, Case]:
    suffix = uuid.uuid4().hex[:8]
    env = worker_env(azurite.connection_string, suffix, base_url=fake.base_url)
    results: dict[str, Case] = {}
    long_name = f"{history} earlier messages"
    with WorkerProcess(env, folder / "worker.log") as worker:
        async with Producer(azurite.connection_string, worker.requests_queue) as producer:
            chats = {"short chat": f"short-{suffix}", long_name: f"long-{suffix}"}
            for chat_id in chats.values():
                await producer.create(chat_id, instructions="You are a weather bot.")
            await wait_created(azurite.connection_string, list(chats.values()))
            seeds = [
                (
                    await producer.post(
                        chats[long_name], f"earlier message {n}", chatModel=ECHO_MODEL
                    )
                )[0]
                for n in range(history // 2)
            ]
            await producer.wait_replies(seeds, within=60 + history)
            for name, chat_id in chats.items():
                case = Case()
                for _ in range(runs):
                    await asyncio.sleep(0.5)  # the worker's last run's acks
                    calls_before = fake.calls()
                    start = await log.amark()
                    began = time.perf_counter()
                    request_id, _sent = await producer.post(chat_id)
                    reply = await producer.reply(request_id, within=60)
                    assert reply.event.get("status") == "completed", reply.event
                    case.seconds += time.perf_counter() - began
                    await asyncio.sleep(1.0)  # its last acknowledgements
                    end = await log.amark()
                    span, outside = run_span(log.worker_requests(start, end))
                    case.last = span
                    case.kinds += by_kind(span)
                    case.operations += by_operation(span)
                    case.idle += outside
                    case.entities += entities_read(span)
                    case.model_calls += fake.calls() - calls_before
                results[name] = case.mean(runs)
    return results


def measure(history: int = 200, runs: int = 2) -> Report:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-requests-") as tmp:
        folder = Path(tmp)
        log_path = folder / "azurite-debug.log"
        with Azurite(debug_log=log_path) as azurite, FakeOpenAI().running_in_thread() as fake:
            log = RequestLog(log_path, azurite)
            results = asyncio.run(_measure(azurite, log, fake, folder, history, runs))
    names = list(results)
    cases = [results[n] for n in names]
    out = Report("Storage requests per run (weather-bot turn: 3 model calls, 2 tool rounds)")
    out.add(
        f"One `assistant-worker run` process, default settings, `chat` backend, instant fake "
        f"model; mean of {runs} runs per chat, counted from Azurite's `--debug` log "
        f"(issue 7: {ISSUE_FIGURE} on the main it started from; target <= {TARGET})."
    )
    out.add(
        kinds_table(
            {n: Counter({k: round(v, 1) for k, v in results[n].kinds.items()}) for n in names}
        )
    )
    all_ops = sorted({op for c in cases for op in c.operations})
    out.add(
        "By Azurite operation (`Messages_Dequeue (empty)`: receives that returned nothing, "
        "within the run's span):\n\n"
        + table(
            ["operation", *names],
            [(op, *(round(c.operations[op], 1) for c in cases)) for op in all_ops],
        )
    )
    out.add(
        table(
            ["per run", *names],
            [
                ("entities read (queries + point reads)", *(c.entities for c in cases)),
                ("model calls", *(c.model_calls for c in cases)),
                ("idle empty receives around the run (not counted)", *(c.idle for c in cases)),
                ("post to reply, seconds", *(round(c.seconds, 2) for c in cases)),
            ],
        )
    )
    out.add(
        f"The worker's requests of one run on the {names[0]}, in order (ids elided; empty "
        "receives folded into the next request):\n\n```\n" + trace(cases[0].last) + "\n```"
    )
    out.numbers = {
        "short_total": cases[0].total,
        "long_total": cases[1].total,
        "short_entities": cases[0].entities,
        "long_entities": cases[1].entities,
        "model_calls": cases[0].model_calls,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--history", type=int, default=200, help="earlier messages (long chat)")
    parser.add_argument("--runs", type=int, default=2, help="measured runs per chat")
    args = parser.parse_args()
    print(measure(args.history, args.runs).markdown())


if __name__ == "__main__":
    main()
