"""Memory against its budget (issue 13, item 7): ``WORKER_CACHE_MB`` beside the cache it replaced,
measured in the same run.

- **Many chats, each touched once**, through the chat cache the way a store's steps use it: a
  create (the system message), a post (the user message and the run's commit), then three
  steps, each taking the last commit, the model steps reading the history, and each committing
  what it did (the model's tool call, the tool's output, the answer). Mixed sizes: system
  200-2,000 characters, user 50-1,000, the tool call ~150, the answer 100-3,000, and the tool
  output 30 KB: a fifth of the messages. Each cache runs in a fresh process: its peak RSS
  (``VmHWM``) against the target of 150 MB + the budget. The old cache keeps up to 100,000
  messages and 4,096 commits per table (one table here; it multiplies with tables).
- **A steady conversation** goes on through it all, a turn every ``--steady-every`` chats (a
  fifth of its tool outputs 30 KB): the share of its steps that found the history and the
  last commit in memory, its hit rate, for both caches.
- **On Azurite**, a steady conversation through the real store (``TableChatStore``, its table
  requests counted), a turn after every ``--others`` other chats' create and turn: the table
  reads its history reads made, with each cache.

Run: ``python -m bench.memory`` (``--chats 100000``, the issue's figure, is the default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from bench.common import REPO_ROOT, Report, quiet_logs, status_kib, table
from worker.runs.model import Run
from worker.store.cache import DEFAULT_CACHE_MB, MIB, ChatMemory, CommittedCache, HistoryCache
from worker.store.layout import ChatMessage, ChatState

# The RSS a worker may have besides its cache (the target is this plus the budget).
BASE_RSS_MB = 150
TOOL_OUTPUT = 30_000
BEGIN = datetime(2026, 1, 1, tzinfo=UTC)
# Text the messages are cut from (each message its own copy, as a table read makes them).
FILLER = "".join(f"{n:05d} the quick brown fox jumps over the lazy dog. " for n in range(700))
TABLE = "BenchMemory"


class History(Protocol):
    def get(self, chat_id: str, created_at: datetime | None) -> list[ChatMessage]: ...
    def put(
        self, chat_id: str, created_at: datetime | None, messages: list[ChatMessage]
    ) -> None: ...
    def extend(
        self, chat_id: str, created_at: datetime | None, messages: list[ChatMessage]
    ) -> None: ...


class Commits(Protocol):
    def put(self, state: ChatState, runs: dict[str, Run], claims: dict[str, str]) -> None: ...
    def take(self, chat_id: str, run_id: str) -> Any: ...


@dataclass
class Hits:
    """Lookups that found what they looked for, of all lookups."""

    history: int = 0
    history_lookups: int = 0
    commits: int = 0
    commit_lookups: int = 0

    def rates(self) -> dict[str, float]:
        return {
            "history": self.history / max(self.history_lookups, 1),
            "commits": self.commits / max(self.commit_lookups, 1),
        }


def text(rng: random.Random, low: int, high: int | None = None) -> str:
    size = low if high is None else rng.randint(low, high)
    start = rng.randrange(0, len(FILLER) - size) if size < len(FILLER) else 0
    return FILLER[start : start + size]


@dataclass
class Chat:
    """One chat as the table holds it (the truth the caches are checked against)."""

    chat_id: str
    created: datetime
    messages: list[ChatMessage] = field(default_factory=list)
    runs: int = 0

    def state(self, run_id: str | None) -> ChatState:
        return ChatState(
            self.chat_id,
            True,
            self.created,
            self.created,
            len(self.messages),
            0,
            {"chatModel": "gpt-4o-mini"},
            etag=f'W/"datetime{len(self.messages)}"',
            active_run_id=run_id,
            next_run_seq=self.runs + 1,
        )

    def add(self, role: Any, content: str, run_id: str | None, tool_calls: str = "") -> ChatMessage:
        message = ChatMessage(
            len(self.messages) + 1,
            role,
            content,
            self.created,
            tool_calls=tool_calls,
            run_id=run_id,
        )
        self.messages.append(message)
        return message


def create(history: History, chat: Chat, rng: random.Random) -> None:
    """An ``assistantCreate``: the chat holds its system message, which the store keeps."""
    chat.add("System", text(rng, 200, 2_000), None)
    history.put(chat.chat_id, chat.created, list(chat.messages))


def turn(
    history: History, commits: Commits, chat: Chat, rng: random.Random, big_output: bool
) -> Hits:
    """A post and its run's three steps, touching the cache as ``TableChatStore`` does: each
    commit extends the history and keeps the state and run; each step takes them back, and
    the model steps read the history (a miss reads the table and keeps what it read)."""
    hits = Hits()
    chat.runs += 1
    run = Run(
        run_id=f"run_{chat.runs:06d}_{chat.chat_id}",
        seq=chat.runs,
        status="in_progress",
        request_id=f"post-{chat.runs}",
        user_message=text(rng, 50, 1_000),
        api="chat",
        model="gpt-4o-mini",
        created_at=chat.created,
        expires_at=chat.created + timedelta(minutes=10),
        params={"chatModel": "gpt-4o-mini"},
        etag='W/"run"',
    )

    def commit(message: ChatMessage, step: int) -> None:
        history.extend(chat.chat_id, chat.created, [message])
        runs = {run.run_id: replace(run, step=step)}
        commits.put(chat.state(run.run_id), runs, {})

    def step(reads_history: bool) -> None:
        hits.commit_lookups += 1
        hits.commits += commits.take(chat.chat_id, run.run_id) is not None
        if not reads_history:
            return
        hits.history_lookups += 1
        total = len(chat.messages)
        if len(history.get(chat.chat_id, chat.created)[:total]) == total:
            hits.history += 1
        else:
            history.put(chat.chat_id, chat.created, list(chat.messages))

    commit(chat.add("User", run.user_message, run.run_id), 0)
    step(reads_history=True)
    calls = json.dumps([{"id": "call_1", "name": "lookup", "arguments": '{"q": "x"}'}])
    commit(chat.add("Assistant", "", run.run_id, tool_calls=calls), 1)
    step(reads_history=False)
    output = text(rng, TOOL_OUTPUT) if big_output else text(rng, 100, 2_000)
    commit(chat.add("Tool", output, run.run_id), 2)
    step(reads_history=True)
    commit(chat.add("Assistant", text(rng, 100, 3_000), run.run_id), 3)
    return hits


def _caches(variant: str, budget_mb: int) -> tuple[History, Commits, ChatMemory | None]:
    if variant == "old":
        from bench import memory_legacy

        return memory_legacy.HistoryCache(), memory_legacy.CommittedCache(), None
    from worker.store.stores import STORE_BYTES, max_stores

    # What ChatStores gives the chats of a worker with this budget (the rest is its stores').
    budget = budget_mb * MIB
    memory = ChatMemory(budget - max_stores(budget) * STORE_BYTES)
    scope = f"AzureWebJobsStorage|{TABLE}"
    return HistoryCache(memory, scope), CommittedCache(memory, scope), memory


def _add(total: Hits, more: Hits) -> None:
    total.history += more.history
    total.history_lookups += more.history_lookups
    total.commits += more.commits
    total.commit_lookups += more.commit_lookups


def child(variant: str, chats: int, budget_mb: int, every: int) -> dict[str, Any]:
    """One cache in this process: ``chats`` chats touched once each, a steady conversation
    through them; peak RSS and hit rates."""
    pid = os.getpid()
    start_kib = status_kib(pid, "VmRSS")
    history, commits, memory = _caches(variant, budget_mb)
    rng = random.Random(13)
    steady = Chat("steady", BEGIN)
    create(history, steady, rng)
    steady_hits, others = Hits(), Hits()
    began = time.perf_counter()
    for n in range(chats):
        chat = Chat(f"chat-{n:06d}", BEGIN + timedelta(microseconds=n))
        create(history, chat, rng)
        _add(others, turn(history, commits, chat, rng, big_output=True))
        if n % every == every - 1:
            big = steady.runs % 5 == 4
            _add(steady_hits, turn(history, commits, steady, rng, big_output=big))
    seconds = time.perf_counter() - began
    return {
        "variant": variant,
        "chats": chats,
        "start_rss_mb": start_kib / 1024,
        "peak_rss_mb": status_kib(pid, "VmHWM") / 1024,
        "seconds": seconds,
        "cache_mb": memory.used / MIB if memory is not None else None,
        "steady_turns": steady.runs,
        "steady": steady_hits.rates(),
        "others": others.rates(),
    }


def _run_child(variant: str, chats: int, budget_mb: int, every: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory",
            "--child",
            variant,
            "--chats",
            str(chats),
            "--budget-mb",
            str(budget_mb),
            "--steady-every",
            str(every),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- on Azurite: the real store ------------------------------------------------------------


async def _store_part(connection: str, variant: str, turns: int, others: int) -> dict[str, Any]:
    """A steady conversation through ``TableChatStore``, a turn after every ``others`` other
    chats' create and turn: the table requests its history reads made."""
    from bench import memory_legacy
    from worker.config.settings import Settings
    from worker.connections.clients import table_service
    from worker.store.layout import AppliedRequest
    from worker.store.stores import ChatStores

    requests: Counter[str] = Counter()

    def observe(_service: str, method: str, _status: str) -> None:
        requests[method] += 1

    settings = Settings.from_env({"AzureWebJobsStorage": connection})
    stores = ChatStores(settings, lambda c: table_service(c, observe))
    table_name = f"{TABLE}{variant.capitalize()}{os.getpid()}"
    rng = random.Random(17)
    history_reads = 0
    history_steps = 0
    try:
        store = await stores.get("AzureWebJobsStorage", table_name, create=True)
        if variant == "old":
            # The same store with the caches it had before: per store, by message count.
            store._history = memory_legacy.HistoryCache()  # type: ignore[assignment]
            store._committed = memory_legacy.CommittedCache()  # type: ignore[assignment]

        async def one_turn(chat: Chat, big_output: bool, counted: bool) -> None:
            nonlocal history_reads, history_steps
            state = await store.load_state(chat.chat_id)
            assert state is not None
            chat.runs += 1
            run = Run(
                run_id=f"run_{chat.runs:06d}_{chat.chat_id}",
                seq=chat.runs,
                status="in_progress",
                request_id=f"post-{chat.runs}",
                user_message=text(rng, 50, 1_000),
                api="chat",
                model="gpt-4o-mini",
                created_at=state.created_at,
                expires_at=state.created_at + timedelta(minutes=10),
            )
            chat.created = state.created_at
            first = chat.add("User", run.user_message, run.run_id)
            await store.commit(
                replace(
                    state,
                    total_messages=len(chat.messages),
                    active_run_id=run.run_id,
                    next_run_seq=state.next_run_seq + 1,
                ),
                runs=[(run, True)],
                messages=[first],
            )
            outputs = [
                chat.add("Assistant", "", run.run_id, tool_calls='[{"id": "c1"}]'),
                chat.add(
                    "Tool",
                    text(rng, TOOL_OUTPUT) if big_output else text(rng, 100, 2_000),
                    run.run_id,
                ),
                chat.add("Assistant", text(rng, 100, 3_000), run.run_id),
            ]
            for step, message in enumerate(outputs):
                kept = store.committed(chat.chat_id, run.run_id)
                if kept is not None:
                    state, current = kept.state, kept.run
                else:
                    loaded_state = await store.load_state(chat.chat_id)
                    loaded_run = await store.load_run(chat.chat_id, run.run_id)
                    assert loaded_state is not None and loaded_run is not None
                    state, current = loaded_state, loaded_run
                if step != 1:  # the model steps read the history
                    before = sum(requests.values())
                    read = await store.history(state)
                    assert len(read) == state.total_messages
                    if counted:
                        history_reads += sum(requests.values()) - before
                        history_steps += 1
                last = step == len(outputs) - 1
                await store.commit(
                    replace(
                        state,
                        total_messages=message.index,
                        active_run_id=None if last else run.run_id,
                    ),
                    runs=[(replace(current, step=step + 1), False)],
                    messages=[message],
                )

        async def new_chat(chat_id: str) -> Chat:
            now = datetime.now(UTC)
            chat = Chat(chat_id, now)
            system = chat.add("System", text(rng, 200, 2_000), None)
            state = ChatState(chat_id, True, now, now, 1, 0, {"chatModel": "gpt-4o-mini"})
            request = AppliedRequest(f"c-{chat_id}", "assistantCreate", f"m-{chat_id}", now)
            await store.reset_chat(state, system, request)
            return chat

        steady = await new_chat("steady")
        for n in range(turns):
            for other in range(others):
                await one_turn(await new_chat(f"o-{n}-{other}"), True, counted=False)
            await one_turn(steady, n % 5 == 4, counted=True)
    finally:
        await stores.close()
    return {
        "variant": variant,
        "turns": turns,
        "history_steps": history_steps,
        "history_reads": history_reads,
        "requests": sum(requests.values()),
    }


def _on_azurite(turns: int, others: int) -> list[dict[str, Any]]:
    from worker.devtools.azurite import Azurite

    with Azurite() as azurite:
        return [
            asyncio.run(_store_part(azurite.connection_string, variant, turns, others))
            for variant in ("new", "old")
        ]


# --- the report -------------------------------------------------------------------------------


def measure(
    chats: int = 100_000,
    budget_mb: int = DEFAULT_CACHE_MB,
    every: int = 500,
    turns: int = 20,
    others: int = 20,
    run_child: Callable[[str, int, int, int], dict[str, Any]] = _run_child,
) -> Report:
    quiet_logs()
    new = run_child("new", chats, budget_mb, every)
    old = run_child("old", chats, budget_mb, every)
    stored = _on_azurite(turns, others) if turns else []
    target = BASE_RSS_MB + budget_mb
    out = Report(f"Memory: {chats:,} chats touched once each (20 % of messages 30 KB)")
    rows = []
    for result, name in ((new, f"bounded, WORKER_CACHE_MB={budget_mb}"), (old, "old, unbounded")):
        rows.append(
            (
                name,
                round(result["peak_rss_mb"]),
                round(result["start_rss_mb"]),
                "-" if result["cache_mb"] is None else round(result["cache_mb"], 1),
                round(result["seconds"], 1),
            )
        )
    out.add(
        "Each cache in a fresh process, driven the way a store's steps use it (create, post, "
        "three steps: take the last commit, read the history, commit). Peak RSS: `VmHWM`; "
        f"target: under {BASE_RSS_MB} MB + the budget = {target} MB. The old cache keeps up to "
        "100,000 messages per table (one table here; each further `collectionName` adds as "
        "much).\n\n"
        + table(
            ["cache", "peak RSS MB", "RSS at start MB", "cache holds MB (estimate)", "seconds"],
            rows,
        )
    )
    out.add(
        f"A steady conversation through it all, a turn every {every} chats: the share of its "
        "steps that found what they needed in memory (and of the other chats' steps).\n\n"
        + table(
            [
                "cache",
                "steady turns",
                "history hits %",
                "last-commit hits %",
                "other chats: history %",
                "other chats: commit %",
            ],
            [
                (
                    label,
                    r["steady_turns"],
                    round(100 * r["steady"]["history"], 1),
                    round(100 * r["steady"]["commits"], 1),
                    round(100 * r["others"]["history"], 1),
                    round(100 * r["others"]["commits"], 1),
                )
                for r, label in ((new, "bounded"), (old, "old"))
            ],
        )
    )
    if stored:
        out.add(
            f"On Azurite: a steady conversation through `TableChatStore`, a turn after every "
            f"{others} other chats' create and turn; table requests made by its history reads "
            "(0 when the history came from memory).\n\n"
            + table(
                ["cache", "steady turns", "history reads", "table requests", "per read"],
                [
                    (
                        "bounded" if s["variant"] == "new" else "old",
                        s["turns"],
                        s["history_steps"],
                        s["history_reads"],
                        round(s["history_reads"] / max(s["history_steps"], 1), 2),
                    )
                    for s in stored
                ],
            )
        )
    out.numbers = {
        "budget_mb": budget_mb,
        "target_mb": target,
        "new_peak_mb": new["peak_rss_mb"],
        "old_peak_mb": old["peak_rss_mb"],
        "new_cache_mb": new["cache_mb"],
        "new_steady": new["steady"],
        "old_steady": old["steady"],
        "steady_turns": new["steady_turns"],
        "store_reads": {s["variant"]: s["history_reads"] for s in stored},
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=100_000)
    parser.add_argument("--budget-mb", type=int, default=DEFAULT_CACHE_MB)
    parser.add_argument("--steady-every", type=int, default=500)
    parser.add_argument("--turns", type=int, default=20, help="steady turns on Azurite (0: none)")
    parser.add_argument("--others", type=int, default=20, help="other chats between them")
    parser.add_argument("--child", choices=["new", "old"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chats, args.budget_mb, args.steady_every)))
        return
    report = measure(args.chats, args.budget_mb, args.steady_every, args.turns, args.others)
    print(report.markdown())


if __name__ == "__main__":
    main()
