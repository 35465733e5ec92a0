"""Profile of the run path: ``--chats`` weather-bot posts through one ``run --burst`` under cProfile.

The scenario: Azurite and the instant fake model (in this process); ``--chats`` chats are
created and drained by an unprofiled ``run --burst``; then one post each (the weather-bot turn
of ``worker.devtools.weather``: 3 model calls, 2 tool rounds, the ``chat`` backend, default
settings) is put on the requests queue, and ONE worker process,
``python -m cProfile -o FILE -m worker run --burst``, processes them all and exits. Its wall
time and CPU seconds (``wait4`` rusage) are taken from here; the ``.prof`` is read with
``pstats``.

"before" is the tree of ``--before`` (default: the main issue 7 started from, see
``bench.startup``; ``git archive`` into a temp folder, first on ``PYTHONPATH``), "after" the work
tree; both on the same Azurite and fake model, each on fresh queue and chat names.

cProfile's clock is wall time: the time the loop sits in ``epoll.poll`` (waiting for Azurite,
the model, a poll interval) is shown as waiting, not work. In "own time by area" a C built-in's
time is counted with the code that calls it (``dict.get`` from a handler is worker code,
``socket.send`` from aiohttp is aiohttp). The profiler slows Python calls down (~1.5x), so
its figures say where the time goes; the unprofiled cost of a post is in ``bench.scaleout``.
Only the main thread is profiled: what runs in threads (sync tools, history shaping) is in the
process's CPU seconds but not in the tables.

Run: ``python -m bench.profile`` (``--chats 40``; ``--smoke``: 3 chats, work tree only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, Report, quiet_logs, table
from bench.harness import Producer, wait_created, worker_env
from bench.startup import BEFORE_COMMIT, tree_of
from worker.devtools.azurite import Azurite, die_with_parent
from worker.testing import FakeOpenAI

Key = tuple[str, int, str]  # pstats: (file, line, function)
FnName = tuple[str, str]  # (file relative to its tree or site-packages, function)

AREAS = (
    "worker code (handlers/ worker/ schemas/)",
    "azure SDK",
    "aiohttp (the storage clients' transport)",
    "openai/httpx",
    "pydantic",
    "structlog/logging",
    "json",
    "asyncio/selectors/ssl/socket",
    "thread hand-offs (to_thread, run_in_executor)",
    "imports (module bodies, importlib, marshal)",
    "other",
)
OTHER = AREAS[-1]
WORKER = AREAS[0]
IMPORTS = AREAS[-2]
WAITING = "waiting (epoll poll, lock waits: not CPU)"
# Blocking waits: wall time the profiler's clock counts but the CPU does not.
WAITS = {
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
    "<method 'acquire' of '_thread.RLock' objects>",
}
# The worker's frames every call of the run sits under (their cumulative time is the whole
# process): left out of the cumulative table.
FRAMES = ("worker/__main__.py", "worker/cli/main.py", "worker/cli/run.py")
_AREA_PREFIXES = (
    (("worker/", "handlers/", "schemas/"), AREAS[0]),
    (("azure/", "isodate/"), AREAS[1]),
    (
        (
            "aiohttp/",
            "aiohappyeyeballs/",
            "yarl/",
            "multidict/",
            "aiosignal/",
            "frozenlist/",
            "propcache/",
        ),
        AREAS[2],
    ),
    (
        ("openai/", "httpx", "httpcore", "anyio/", "h11/", "sniffio/", "jiter/", "distro/"),
        AREAS[3],
    ),
    (("pydantic", "annotated_types/", "typing_inspection/"), AREAS[4]),
    (("structlog/", "logging/"), AREAS[5]),
    (("json/",), AREAS[6]),
    (("asyncio/threads.py", "concurrent/futures/"), AREAS[8]),
    (("asyncio/", "selectors.py", "ssl.py", "socket.py"), AREAS[7]),
    (("<frozen importlib", "<frozen zipimport", "importlib/"), AREAS[9]),
)
_BUILTIN_HINTS = (
    ("pydantic_core", AREAS[4]),
    ("_json", AREAS[6]),
    ("select.", AREAS[7]),
    ("_socket", AREAS[7]),
    ("_ssl", AREAS[7]),
    ("_asyncio", AREAS[7]),
    ("marshal", AREAS[9]),
    ("_imp.", AREAS[9]),
)
Stat = tuple[int, int, float, float, dict[Key, tuple[int, int, float, float]]]


@dataclass
class Profile:
    """One tree's profiled burst."""

    tree: str
    posts: int
    wall: float = 0.0  # exec to exit, seconds
    cpu: float = 0.0  # user + system seconds (rusage of the process)
    replies: int = 0
    completed: int = 0
    model_calls: int = 0
    total: float = 0.0  # the profile's clock over the process (wall, main thread)
    waiting: float = 0.0
    imports: float = 0.0  # cumulative time under importlib's _find_and_load
    own: dict[FnName, float] = field(default_factory=dict)
    cumulative: dict[FnName, float] = field(default_factory=dict)
    calls: dict[FnName, int] = field(default_factory=dict)
    areas: dict[str, float] = field(default_factory=dict)
    area: dict[FnName, str] = field(default_factory=dict)  # where each function's time went

    @property
    def busy(self) -> float:
        return self.total - self.waiting

    @property
    def scale(self) -> float:
        """Profile seconds to CPU seconds: on a loaded machine the wall clock also runs while
        the process waits for a core (or another thread holds the GIL)."""
        return self.cpu / self.busy if self.busy > 0 and self.cpu > 0 else 1.0

    def per_post_ms(self, seconds: float) -> float:
        return seconds / self.posts * 1000 if self.posts else float("nan")

    def cpu_ms(self, profile_seconds: float) -> float:
        """Profile seconds as CPU ms per post."""
        return self.per_post_ms(profile_seconds * self.scale)


# -- reading a .prof ------------------------------------------------------------------------


def _prefixes(tree: Path | None) -> list[str]:
    """Path prefixes to strip, longest first: site-packages, the stdlib, the tree."""
    paths = sysconfig.get_paths()
    found = {paths["purelib"], paths["platlib"], paths["stdlib"], str(REPO_ROOT)}
    if tree is not None:
        found.add(str(tree))
    return sorted((p.rstrip("/") + "/" for p in found), key=len, reverse=True)


def short_name(filename: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        if filename.startswith(prefix):
            return filename[len(prefix) :]
    return filename


def fn_name(key: Key, prefixes: list[str]) -> FnName:
    """A function's name alike in both trees: the file relative to its tree (or to
    site-packages, the stdlib), no line, no object address."""
    return short_name(key[0], prefixes), re.sub(r" at 0x[0-9a-f]+", "", key[2])


def area_of(name: FnName) -> str:
    """The area of a function by its file (a module body: imports); ``OTHER`` for the
    stdlib's helpers and C built-ins, whose time goes to their callers' areas."""
    path, function = name
    if function == "<module>":
        return IMPORTS
    if path == "~":
        for hint, area in _BUILTIN_HINTS:
            if hint in function:
                return area
        return OTHER
    for prefixes, area in _AREA_PREFIXES:
        if path.startswith(prefixes):
            return area
    return OTHER


class _Areas:
    """Where a function's own time goes: its own area, or (stdlib helpers, built-ins) that of
    its callers, in proportion to the time each caller's calls took, up the call graph."""

    def __init__(self, raw: dict[Key, Stat], names: dict[Key, FnName]) -> None:
        self.raw = raw
        self.names = names
        self._memo: dict[Key, dict[str, float]] = {}
        self._visiting: set[Key] = set()

    def shares(self, key: Key) -> dict[str, float]:
        """{area: fraction} of ``key``'s time."""
        area = area_of(self.names.get(key, ("?", key[2])))
        if area != OTHER:
            return {area: 1.0}
        if key in self._memo:
            return self._memo[key]
        if key in self._visiting or key not in self.raw:
            return {OTHER: 1.0}
        self._visiting.add(key)
        try:
            callers = self.raw[key][4]
            weights = {caller: stat[3] for caller, stat in callers.items() if stat[3] > 0}
            result = self.split(weights)
        finally:
            self._visiting.discard(key)
        self._memo[key] = result
        return result

    def split(self, weights: dict[Key, float]) -> dict[str, float]:
        total = sum(weights.values())
        if total <= 0:
            return {OTHER: 1.0}
        result: dict[str, float] = defaultdict(float)
        for caller, weight in weights.items():
            for area, fraction in self.shares(caller).items():
                result[area] += fraction * weight / total
        return dict(result)

    def of_own_time(self, key: Key) -> dict[str, float]:
        """{area: fraction} of ``key``'s own time (split by each caller's share of it)."""
        if area_of(self.names[key]) != OTHER:
            return {area_of(self.names[key]): 1.0}
        callers = self.raw[key][4]
        return self.split({caller: stat[2] for caller, stat in callers.items() if stat[2] > 0})


def read_profile(path: Path, tree: Path | None, profile: Profile) -> Profile:
    """Fill ``profile`` from the ``.prof`` at ``path`` (of the worker run from ``tree``)."""
    stats: Any = pstats.Stats(str(path))
    raw: dict[Key, Stat] = stats.stats
    prefixes = _prefixes(tree)
    names = {key: fn_name(key, prefixes) for key in raw}
    for stat in raw.values():
        for caller in stat[4]:
            names.setdefault(caller, fn_name(caller, prefixes))
    attribution = _Areas(raw, names)
    own: dict[FnName, float] = defaultdict(float)
    cumulative: dict[FnName, float] = defaultdict(float)
    calls: dict[FnName, int] = defaultdict(int)
    areas: dict[str, float] = defaultdict(float)
    by_function: dict[FnName, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    total = waiting = imports = 0.0
    for key, (_cc, nc, tt, ct, _callers) in raw.items():
        name = names[key]
        total += tt
        own[name] += tt
        cumulative[name] += ct
        calls[name] += nc
        if name[0] == "~" and name[1] in WAITS:
            waiting += tt
            continue
        if name[1] == "_find_and_load" and name[0].startswith("<frozen importlib"):
            # Nested imports are recursive calls of the same function: ct counts them once.
            imports += ct
        for area, fraction in attribution.of_own_time(key).items():
            areas[area] += tt * fraction
            by_function[name][area] += tt * fraction
    profile.total, profile.waiting, profile.imports = total, waiting, imports
    profile.own, profile.cumulative, profile.calls = dict(own), dict(cumulative), dict(calls)
    profile.areas = dict(areas)
    profile.area = {
        name: max(shares, key=lambda a: shares[a]) for name, shares in by_function.items()
    }
    return profile


# -- the scenario ---------------------------------------------------------------------------


def _burst(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float
) -> tuple[float, float]:
    """Run ``cmd`` to its exit; (wall seconds, CPU seconds from its rusage)."""
    with log.open("ab") as out:
        began = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {log.read_text()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


async def _send(
    connection: str, queue: str, chats: list[str], *, posts: bool
) -> tuple[str, list[str]]:
    """Creates (``posts=False``) or one post per chat; (the reply queue, the request ids)."""
    request_ids = []
    async with Producer(connection, queue, poll_interval=1.0) as producer:
        for chat_id in chats:
            if posts:
                request_ids.append((await producer.post(chat_id))[0])
            else:
                await producer.create(chat_id, instructions="You are a weather bot.")
        return producer.reply_queue, request_ids


async def _collect(
    connection: str, queue: str, reply_queue: str, request_ids: list[str]
) -> list[Any]:
    """The replies the burst left on ``reply_queue`` (all, or those that came within 30 s)."""
    async with Producer(connection, queue, reply_queue=reply_queue, poll_interval=0.05) as p:
        with contextlib.suppress(TimeoutError):
            await p.wait_replies(request_ids, within=30)
        return [reply.event for reply in p.replies.values()]


def profile_tree(
    name: str,
    tree: Path | None,
    azurite: Azurite,
    fake: FakeOpenAI,
    folder: Path,
    chats: int,
    timeout: float,
) -> Profile:
    """Create and drain ``chats`` chats, post to each, profile the burst that runs them."""
    connection = azurite.connection_string
    suffix = uuid.uuid4().hex[:8]
    env = worker_env(connection, f"pf{suffix}", base_url=fake.base_url)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # ahead of the editable install of the work tree
    cwd = tree or REPO_ROOT
    queue = env["WORKER_REQUESTS_QUEUE"]
    log = folder / f"worker-{name}.log"
    chat_ids = [f"pf-{suffix}-{n}" for n in range(chats)]
    worker = [sys.executable, "-m", "worker", "run", "--burst"]

    asyncio.run(_send(connection, queue, chat_ids, posts=False))
    _burst(worker, env, cwd, log, timeout)
    asyncio.run(wait_created(connection, chat_ids, within=60))

    reply_queue, request_ids = asyncio.run(_send(connection, queue, chat_ids, posts=True))
    prof = folder / f"{name}.prof"
    calls_before = fake.calls()
    out = Profile(name, chats)
    out.wall, out.cpu = _burst(
        [sys.executable, "-m", "cProfile", "-o", str(prof), *worker[1:]], env, cwd, log, timeout
    )
    out.model_calls = fake.calls() - calls_before
    replies = asyncio.run(_collect(connection, queue, reply_queue, request_ids))
    out.replies = len(replies)
    out.completed = sum(1 for event in replies if event.get("status") == "completed")
    if not prof.exists():
        raise RuntimeError(f"no profile from the {name} burst: {log.read_text()[-2000:]}")
    return read_profile(prof, tree, out)


def measure(
    chats: int = 40,
    before: str | None = BEFORE_COMMIT,
    top: int = 15,
    timeout: float = 300.0,
    save: Path | None = None,
) -> Report:
    """Profile the burst on the work tree ("after") and on ``before`` (a commit; None: the work
    tree only)."""
    quiet_logs()
    profiles: list[Profile] = []
    with contextlib.ExitStack() as stack:
        trees: dict[str, Path | None] = {}
        if before is not None:
            # Not a git checkout, or the commit is unknown: no "before".
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                trees["before"] = stack.enter_context(tree_of(before))
        trees["after"] = None
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            folder = save
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-profile-")))
        azurite = stack.enter_context(Azurite())
        fake = stack.enter_context(FakeOpenAI().running_in_thread())
        for name, tree in trees.items():
            profiles.append(profile_tree(name, tree, azurite, fake, folder, chats, timeout))
    return report(profiles, top, before if "before" in trees else None)


# -- the report -----------------------------------------------------------------------------


def _short_area(area: str) -> str:
    return area.split(" (")[0]


def _label(name: FnName) -> str:
    path, function = name
    if path == "~":
        return f"`{function}`"
    return f"`{path}:{function}`"


def _top(profiles: list[Profile], attribute: str, top: int, keep: Any) -> list[tuple[Any, ...]]:
    """Rows of the union of each profile's ``top`` functions by ``attribute`` (CPU ms and calls
    per post), the biggest first."""
    chosen: set[FnName] = set()
    for profile in profiles:
        values: dict[FnName, float] = getattr(profile, attribute)
        candidates = sorted((n for n in values if keep(n)), key=values.__getitem__, reverse=True)
        chosen.update(candidates[:top])

    def biggest(name: FnName) -> float:
        return max(p.cpu_ms(getattr(p, attribute).get(name, 0.0)) for p in profiles)

    rows = []
    for name in sorted(chosen, key=biggest, reverse=True):
        area = next((p.area[name] for p in reversed(profiles) if name in p.area), OTHER)
        row: list[Any] = [_label(name), _short_area(area)]
        for profile in profiles:
            values = getattr(profile, attribute)
            if name in values:
                row.append(round(profile.cpu_ms(values[name]), 2))
                row.append(round(profile.calls[name] / profile.posts, 1))
            else:
                row.extend(("-", "-"))
        rows.append(tuple(row))
    return rows


def _not_a_wait(name: FnName) -> bool:
    return not (name[0] == "~" and name[1] in WAITS)


def _worker_function(name: FnName) -> bool:
    return area_of(name) == WORKER and not name[0].startswith(FRAMES) and name[1] != "<module>"


def report(profiles: list[Profile], top: int = 15, before: str | None = None) -> Report:
    names = [p.tree for p in profiles]
    after = profiles[-1]
    baseline = profiles[0] if len(profiles) > 1 else None
    out = Report(f"Profile of the run path ({after.posts} weather-bot posts, one `run --burst`)")
    out.add(
        f"{after.posts} chats created and drained first (not profiled); then one weather-bot "
        "post each (3 model calls, 2 tool rounds, `chat` backend, instant fake model, default "
        "settings) and ONE `python -m cProfile -o FILE -m worker run --burst` that runs them "
        "all and exits"
        + (
            f"; before: commit `{before}` (`git archive`), after: the work tree; the same "
            "Azurite and fake model, fresh queues."
            if baseline
            else " (work tree only)."
        )
        + " Wall and CPU are the profiled process's, start-up and imports included (cProfile "
        "slows Python code down ~1.5x). cProfile's clock is wall time on the main thread: "
        "the time the loop waits in `epoll.poll` is left out as waiting, and the rest (which "
        "on a loaded machine also runs while the process waits for a core) is scaled to the "
        "process's CPU seconds: every ms below is such a CPU ms per post."
    )

    def change(get: Any) -> str:
        if baseline is None:
            return "-"
        old, new = get(baseline), get(after)
        return f"{new / old:.2f}x" if old else "-"

    figures: list[tuple[str, Any]] = [
        ("burst wall, s", lambda p: round(p.wall, 2)),
        ("burst CPU (user + system), s", lambda p: round(p.cpu, 2)),
        ("CPU ms per post", lambda p: round(p.per_post_ms(p.cpu), 1)),
        ("of which imports (CPU ms per post)", lambda p: round(p.cpu_ms(p.imports), 1)),
        ("profile clock, busy (not waiting), s", lambda p: round(p.busy, 2)),
        ("profile clock, waiting (epoll, locks), s", lambda p: round(p.waiting, 2)),
    ]
    rows: list[tuple[Any, ...]] = [
        (label, *(get(p) for p in profiles), change(get)) for label, get in figures
    ]
    rows.append(("CPU / busy profile clock", *(round(p.scale, 2) for p in profiles), "-"))
    rows.append(("replies (completed)", *(f"{p.replies} ({p.completed})" for p in profiles), "-"))
    rows.append(("model calls", *(p.model_calls for p in profiles), "-"))
    out.add(table(["figure", *names, "after / before"], rows))
    area_rows = []
    for area in AREAS:
        row: list[Any] = [area]
        for profile in profiles:
            seconds = profile.areas.get(area, 0.0)
            row.append(round(profile.cpu_ms(seconds), 1))
            row.append(f"{100 * seconds / profile.busy:.0f}%" if profile.busy else "-")
        area_rows.append(tuple(row))
    area_rows.append(
        ("**total**", *(v for p in profiles for v in (round(p.cpu_ms(p.busy), 1), "100%")))
    )
    out.add(
        "Own time by area, CPU ms per post. The stdlib's helpers and C built-ins (`isinstance`, "
        "`re`, `typing`, `email`, `dataclasses`...) count with the area that called them, in "
        "proportion up the call graph; a module body counts as imports; 'thread hand-offs' is "
        "`asyncio.to_thread` / `run_in_executor` (`SimpleQueue.put` wakes the thread, which "
        "then holds the GIL while the main thread's clock runs):\n\n"
        + table(["area", *(f"{n} {u}" for n in names for u in ("ms", "%"))], area_rows)
    )
    columns = ["function", "area", *(f"{n} {u}" for n in names for u in ("ms", "calls"))]
    out.add(
        f"Top {top} functions by own time in each tree (CPU ms and calls per post; a "
        "coroutine's calls count its resumptions; area: where most of its time is counted):"
        "\n\n" + table(columns, _top(profiles, "own", top, _not_a_wait))
    )
    out.add(
        f"Top {top} of the worker's own functions (handlers/ worker/ schemas/) by cumulative "
        "time, CPU ms and calls per post, without the CLI and `<module>` frames everything "
        "sits under (below them the azure pipeline, the openai client: see the areas); a "
        "coroutine's time counts while it runs, not while it awaits, and a lazy import (the "
        "model SDK at the first model call) counts in the function that triggers it:\n\n"
        + table(columns, _top(profiles, "cumulative", top, _worker_function))
    )
    worker_own = sorted(
        (n for n in after.own if area_of(n) == WORKER), key=after.own.__getitem__, reverse=True
    )
    out.numbers = {
        "posts": after.posts,
        "replies": after.replies,
        "completed": after.completed,
        "model_calls": after.model_calls,
        "wall_s": after.wall,
        "cpu_s": after.cpu,
        "cpu_ms_per_post": after.per_post_ms(after.cpu),
        "busy_s": after.busy,
        "areas_ms": {area: after.cpu_ms(seconds) for area, seconds in after.areas.items()},
        "worker_top": [(_label(n), after.cpu_ms(after.own[n])) for n in worker_own[:5]],
        "before_cpu_ms_per_post": baseline.per_post_ms(baseline.cpu) if baseline else None,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=40, help="chats, one post each")
    parser.add_argument("--top", type=int, default=15, help="functions per table")
    parser.add_argument("--before", default=BEFORE_COMMIT, help="commit of the 'before' tree")
    parser.add_argument("--no-before", action="store_true", help="profile the work tree only")
    parser.add_argument("--smoke", action="store_true", help="3 chats, the work tree only")
    parser.add_argument(
        "--save", type=Path, help="keep the .prof files and worker logs in this folder"
    )
    args = parser.parse_args()
    if args.smoke:
        report_ = measure(chats=3, before=None, top=args.top, save=args.save)
    else:
        before = None if args.no_before else args.before
        report_ = measure(args.chats, before, args.top, save=args.save)
    print(report_.markdown())


if __name__ == "__main__":
    main()
