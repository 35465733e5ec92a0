"""What an MCP tool call costs the worker: CPU over a local tool call returning the same result.

Issue 16's target: an MCP tool call adds at most 5 ms of worker CPU over a local tool call
returning the same result, with the session reused across calls. Measured two ways, in the
same run, against the same baseline:

1. **Turns through the worker.** A worker in this process (``open_app``, the real queues on
   Azurite, the fake model and the MCP server in processes of their own, so that this
   process's CPU is the worker's), and posts that alternate: the model asks for ``--calls``
   parallel calls of the MCP server's ``get_weather``, or of the local ``local_weather``
   (an async ``@tool`` returning the same dict), then answers. The worker's CPU per post
   (``time.process_time`` around ``run_until_idle``; the producer's sends are outside it);
   (MCP - local) / calls is the cost of one MCP call. The first post of each kind is a
   warm-up (the SDK's import, the session, the tool list).
2. **The call path alone.** ``ToolSetup.run`` (what a tools step calls for each call) in a
   loop, in batches that alternate local and MCP: CPU per call. And a cProfile of the MCP
   loop: where its CPU goes, by package and by function.

The MCP server is ``tests/support/mcp_server.py`` (``MCPServer`` over Streamable HTTP, with a
bearer token, as in production). Run: ``python -m bench.mcp`` (``--smoke``: tiny sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from bench.common import REPO_ROOT, Report, quiet_logs, table
from bench.mcp_model import LOCAL_TOOL, MCP_TOOL
from bench.profile import Profile, read_profile
from handlers.mcp_tools import load_toolset
from handlers.services import RunServices
from handlers.step import ToolSetup
from handlers.tool_calls import ToolCall
from handlers.tools import ToolRegistry, tool
from tests.support.mcp_server import McpServerProcess, forecast
from worker.app import open_app
from worker.config.settings import Settings
from worker.devtools.azurite import Azurite, die_with_parent

TARGET_MS = 5.0
TOKEN = "bench-mcp-token-0123456789"


@tool
async def local_weather(city: str) -> dict[str, str]:
    """The current weather in a city (the same answer as the MCP server's get_weather)."""
    return forecast(city)


# --- the fake model, a process of its own --------------------------------------------------


@contextlib.contextmanager
def fake_model(log: Path) -> Iterator[str]:
    """``python -m worker.testing.fake_openai`` with this benchmark's script; its base URL."""
    with log.open("ab") as errors:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "worker.testing.fake_openai", "--port", "0",
                "--scenario-callable", "bench.mcp_model:mcp_scenario",
            ],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = _first_line(proc.stdout, timeout=30)
        if not line:
            raise RuntimeError(f"the fake model did not start: {log.read_text()[-2000:]}")
        yield str(json.loads(line)["base_url"])
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


def _first_line(stream: IO[bytes], timeout: float) -> str:
    found: list[str] = []

    def read() -> None:
        found.append(stream.readline().decode())
        for _ in stream:  # drain, so the pipe never fills
            pass

    threading.Thread(target=read, name="fake-model-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline:
        time.sleep(0.02)
    return found[0].strip() if found else ""


# --- 1. turns through the worker -----------------------------------------------------------


async def _turns(
    settings: Settings, connection: str, registry: ToolRegistry, posts: int, calls: int
) -> dict[str, list[tuple[float, float]]]:
    """(CPU s, wall s) of the worker per post, by kind; the first of each kind left out."""
    from azure.storage.queue.aio import QueueClient

    kinds = ["local", "mcp"] * (posts + 1)
    chats = [f"mcp-bench-{uuid.uuid4().hex[:8]}-{n}" for n in range(len(kinds))]
    measured: dict[str, list[tuple[float, float]]] = defaultdict(list)
    async with QueueClient.from_connection_string(connection, settings.requests_queue) as queue:
        with contextlib.suppress(Exception):
            await queue.create_queue()
        for chat in chats:
            await queue.send_message(
                json.dumps({"type": "assistantCreate", "id": chat, "mcpServers": ["weather"]})
            )
        async with open_app(settings, tools=registry) as app:
            await app.worker.run_until_idle()
            for n, (kind, chat) in enumerate(zip(kinds, chats, strict=True)):
                body = {"type": "assistantPost", "id": chat, "userMessage": f"{kind} {calls}"}
                await queue.send_message(json.dumps(body))
                cpu, wall = time.process_time(), time.perf_counter()
                await app.worker.run_until_idle()
                if n >= 2:  # the first of each kind warms up
                    measured[kind].append((time.process_time() - cpu, time.perf_counter() - wall))
    return measured


# --- 2. the call path alone ----------------------------------------------------------------


async def _path(
    settings: Settings, registry: ToolRegistry, calls: int, batches: int, profile_to: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]], float, int]:
    """CPU and wall seconds per call by kind (one figure per batch), the CPU of the profiled
    MCP loop, and its calls."""
    from worker.mcp.servers import McpServers

    servers = McpServers(settings.mcp_servers)
    services = RunServices(
        stores=cast(Any, None),  # a tool call touches no store
        settings=settings,
        backends={},
        tools=registry,
        clock=lambda: datetime.now(UTC),
        mcp=servers,
    )
    defaults: dict[str, Any] = {"tools": [LOCAL_TOOL], "mcpServers": ["weather"]}
    setup = ToolSetup(services, defaults, await load_toolset(servers, defaults))
    names = {"local": LOCAL_TOOL, "mcp": MCP_TOOL}
    cpu: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)

    async def loop(kind: str, count: int) -> None:
        for n in range(count):
            arguments = json.dumps({"city": f"City {n}"})
            result = await setup.run(ToolCall(f"call_{n}", names[kind], arguments), 30.0)
            if not result.ok:
                raise RuntimeError(f"{kind} call failed: {result.output}")

    try:
        for kind in names:  # warm-up: the session, the tool list, the first of everything
            await loop(kind, 5)
        for _ in range(batches):
            for kind in names:
                began_cpu, began = time.process_time(), time.perf_counter()
                await loop(kind, calls)
                cpu[kind].append((time.process_time() - began_cpu) / calls)
                wall[kind].append((time.perf_counter() - began) / calls)
        profiler = cProfile.Profile()
        began_cpu = time.process_time()
        profiler.enable()
        await loop("mcp", calls)
        profiler.disable()
        profiled_cpu = time.process_time() - began_cpu
        profiler.dump_stats(str(profile_to))
    finally:
        await servers.close()
    return cpu, wall, profiled_cpu, calls


# --- the measure -----------------------------------------------------------------------------


def measure(posts: int = 20, calls: int = 10, path_calls: int = 200, batches: int = 5) -> Report:
    """``posts`` of each kind with ``calls`` calls each; ``batches`` of ``path_calls`` calls of
    each kind on the call path, and one more profiled."""
    quiet_logs()
    registry = ToolRegistry([local_weather])
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-mcp-")))
        azurite = stack.enter_context(Azurite())
        server = stack.enter_context(McpServerProcess(folder, token=TOKEN))
        base_url = stack.enter_context(fake_model(folder / "fake.log"))
        suffix = uuid.uuid4().hex[:8]
        env = {
            "AzureWebJobsStorage": azurite.connection_string,
            "WORKER_REQUESTS_QUEUE": f"req-{suffix}",
            "WORKER_RUNS_QUEUE": f"runs-{suffix}",
            "WORKER_DEADLINES_QUEUE": f"dl-{suffix}",
            "OPENAI_BASE_URL": base_url,
            "OPENAI_API_KEY": "sk-bench",
            "CHAT_MODEL_DEPLOYMENT_NAME": "mcp-bench",
            **server.env(),
        }
        settings = Settings.from_env(env)
        turns = asyncio.run(_turns(settings, azurite.connection_string, registry, posts, calls))
        handshakes_after_turns = server.sessions_opened()
        profile_path = folder / "mcp.prof"
        cpu, wall, profiled_cpu, profiled_calls = asyncio.run(
            _path(settings, registry, path_calls, batches, profile_path)
        )
        profile = Profile("mcp", profiled_calls)
        profile.cpu = profiled_cpu
        read_profile(profile_path, None, profile)
        lists = server.methods().count("tools/list")
        executions = len(server.executions("get_weather"))
    return report(turns, calls, cpu, wall, profile, handshakes_after_turns, lists, executions)


def _median_ms(values: list[tuple[float, float]], index: int) -> float:
    return statistics.median(v[index] for v in values) * 1000 if values else float("nan")


def _mean_ms(values: list[tuple[float, float]], index: int) -> float:
    return statistics.fmean(v[index] for v in values) * 1000 if values else float("nan")


def report(
    turns: dict[str, list[tuple[float, float]]],
    calls: int,
    cpu: dict[str, list[float]],
    wall: dict[str, list[float]],
    profile: Profile,
    handshakes_after_turns: int,
    lists: int,
    executions: int,
) -> Report:
    out = Report("MCP tool calls against local tool calls (issue 16)")
    out.add(
        "The same answer (a small JSON object) from a local async `@tool` and from a tool of a "
        "real MCP server (the `mcp` SDK's `MCPServer`, Streamable HTTP, a bearer token; its own "
        "process), measured in the same run; only the worker's CPU is counted (the fake model, "
        "Azurite and the MCP server are other processes). Target: an MCP call adds at most "
        f"{TARGET_MS:g} ms of worker CPU over the local one, the session reused."
    )
    local, mcp = turns.get("local", []), turns.get("mcp", [])
    turn_rows = [
        (
            kind,
            len(values),
            calls,
            round(_median_ms(values, 0), 1),
            round(_mean_ms(values, 0), 1),
            round(_median_ms(values, 1), 1),
        )
        for kind, values in (("local", local), ("mcp", mcp))
    ]
    extra_turn = (_median_ms(mcp, 0) - _median_ms(local, 0)) / calls
    extra_turn_mean = (_mean_ms(mcp, 0) - _mean_ms(local, 0)) / calls
    out.add(
        f"**1. Turns through the worker** (in-process worker on Azurite; each post: one round of "
        f"{calls} parallel calls, then the answer; the posts alternate, the first of each kind "
        "left out as warm-up):\n\n"
        + table(
            [
                "tool",
                "posts",
                "calls per post",
                "CPU ms per post, median",
                "mean",
                "wall ms per post, median",
            ],
            turn_rows,
        )
        + f"\n\nAn MCP call costs **{extra_turn:.2f} ms** more worker CPU than a local one "
        f"(medians; means: {extra_turn_mean:.2f} ms); target ≤ {TARGET_MS:g} ms."
    )
    path_rows = []
    for kind in ("local", "mcp"):
        path_rows.append(
            (
                kind,
                len(cpu[kind]),
                round(statistics.median(cpu[kind]) * 1e6),
                round(min(cpu[kind]) * 1e6),
                round(statistics.median(wall[kind]) * 1e6),
            )
        )
    extra_path = (statistics.median(cpu["mcp"]) - statistics.median(cpu["local"])) * 1000
    out.add(
        "**2. The call path alone** (`ToolSetup.run`, what a tools step calls for each call: "
        "the argument checks, the call, the result; one call after another, batches "
        "alternating):\n\n"
        + table(
            ["tool", "batches", "CPU µs per call, median", "best batch", "wall µs per call"],
            path_rows,
        )
        + f"\n\nAn MCP call on the call path: **{extra_path:.2f} ms** more CPU than a local "
        "one. The session was opened "
        f"{handshakes_after_turns} time(s) for all the turns' calls (the server counts the "
        f"handshakes), and its tools listed {lists} time(s) in the whole benchmark (cached a "
        f"minute per process; the call path's own `McpServers` lists once more); the server "
        f"ran {executions} calls."
    )
    out.add(_profile_tables(profile))
    out.numbers = {
        "turn_extra_ms_per_call": extra_turn,
        "turn_extra_ms_per_call_mean": extra_turn_mean,
        "path_extra_ms_per_call": extra_path,
        "local_path_us": statistics.median(cpu["local"]) * 1e6,
        "mcp_path_us": statistics.median(cpu["mcp"]) * 1e6,
        "handshakes_for_turns": handshakes_after_turns,
        "tool_lists": lists,
        "executions": executions,
        "posts": (len(local), len(mcp)),
    }
    return out


def _package(path: str) -> str:
    """The package a profiled function belongs to (by its file), for the table by package."""
    if path == "~":
        return "C built-ins (called by the rows above)"
    if path.startswith(("worker/", "handlers/", "schemas/")):
        return "worker code (handlers/ worker/)"
    head = path.split("/")[0]
    if head.startswith("<frozen"):
        return "imports"
    return head.removesuffix(".py")


def _profile_tables(profile: Profile, top: int = 15) -> str:
    """The profiled MCP loop: CPU µs per call by package and the top functions by own time."""
    calls = profile.posts
    scale = profile.scale

    def per_call_us(seconds: float) -> float:
        return seconds * scale / calls * 1e6

    packages: dict[str, float] = defaultdict(float)
    for name, seconds in profile.own.items():
        if name[0] == "~" and "epoll" in name[1]:
            continue
        packages[_package(name[0])] += seconds
    package_rows = sorted(
        ((name, round(per_call_us(seconds), 1)) for name, seconds in packages.items()),
        key=lambda row: -row[1],
    )
    functions = sorted(
        (n for n in profile.own if not (n[0] == "~" and "epoll" in n[1])),
        key=profile.own.__getitem__,
        reverse=True,
    )[:top]
    function_rows = [
        (
            f"`{path}:{function}`" if path != "~" else f"`{function}`",
            round(per_call_us(profile.own[(path, function)]), 1),
            round(profile.calls[(path, function)] / calls, 1),
        )
        for path, function in functions
    ]
    return (
        f"**3. Profile of the MCP call path** (cProfile over {calls} calls of "
        "`ToolSetup.run` on the MCP tool, in this process: the worker's code, the `mcp` SDK and "
        "its transport, every task of the loop; the profile's busy clock scaled to the loop's "
        f"CPU, {profile.cpu / calls * 1e6:.0f} µs per call under the profiler). Own time by "
        "package, CPU µs per call:\n\n"
        + table(["package", "µs per call"], package_rows)
        + f"\n\nTop {top} functions by own time (CPU µs and calls per MCP call):\n\n"
        + table(["function", "µs", "calls"], function_rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posts", type=int, default=20, help="posts of each kind")
    parser.add_argument("--calls", type=int, default=10, help="parallel calls per post")
    parser.add_argument("--path-calls", type=int, default=200, help="calls per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches of each kind")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    args = parser.parse_args()
    if args.smoke:
        result = measure(posts=2, calls=3, path_calls=20, batches=2)
    else:
        result = measure(args.posts, args.calls, args.path_calls, args.batches)
    print(result.markdown())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
