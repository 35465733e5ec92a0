"""Scale-out: 1, 2 and 4 worker processes on one queue, simple posts (echo model).

``--posts`` chats are created first (not timed); then one post each is sent at once and the
wave is timed until every reply has reached the producer. CPU over the wave from ``/proc``: the
worker processes together, Azurite (node), and this process (the fake model and the producer).
On a 2-core machine, "cores busy" near 2.0 means the machine is the limit; a worker process near
1.0 core is bound by its own event loop.

Run: ``python -m bench.scaleout --posts 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import (
    Report,
    cpu_seconds,
    machine_busy_seconds,
    quiet_logs,
    table,
    tree_cpu_seconds,
)
from bench.harness import ECHO_MODEL, Producer, WorkerProcess, wait_created, worker_env
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

PROCESSES = (1, 2, 4)


async def _wave(
    azurite: Azurite, fake: FakeOpenAI, folder: Path, processes: int, posts: int
) -> dict[str, Any]:
    connection = azurite.connection_string
    suffix = uuid.uuid4().hex[:8]
    env = worker_env(connection, f"so{suffix}", base_url=fake.base_url, model=ECHO_MODEL, tools="")
    with ExitStack() as stack:
        workers = [
            stack.enter_context(WorkerProcess(env, folder / f"worker-{suffix}-{n}.log"))
            for n in range(processes)
        ]
        async with Producer(connection, workers[0].requests_queue, poll_interval=0.02) as producer:
            chats = [f"so-{suffix}-{n}" for n in range(posts)]
            limiter = asyncio.Semaphore(16)

            async def send(coroutine: Any) -> Any:
                async with limiter:
                    return await coroutine

            await asyncio.gather(*(send(producer.create(chat)) for chat in chats))
            await wait_created(connection, chats, within=120)
            await asyncio.sleep(1.0)
            before_workers = sum(cpu_seconds(w.pid) for w in workers)
            before_azurite = tree_cpu_seconds(azurite.pid)
            before_self = time.process_time()
            before_machine = machine_busy_seconds()
            began = time.perf_counter()
            sent = await asyncio.gather(*(send(producer.post(chat, "hello")) for chat in chats))
            await producer.wait_replies([request_id for request_id, _ in sent], within=300)
            wall = time.perf_counter() - began
            worker_cpu = sum(cpu_seconds(w.pid) for w in workers) - before_workers
            azurite_cpu = tree_cpu_seconds(azurite.pid) - before_azurite
            self_cpu = time.process_time() - before_self
            machine_cpu = machine_busy_seconds() - before_machine
    return {
        "processes": processes,
        "wall": wall,
        "rate": posts / wall,
        "worker_cores": worker_cpu / wall,
        "per_process": worker_cpu / wall / processes,
        "azurite_cores": azurite_cpu / wall,
        "bench_cores": self_cpu / wall,
        "machine_cores": machine_cpu / wall,
        "worker_ms": worker_cpu / posts * 1000,
        "azurite_ms": azurite_cpu / posts * 1000,
    }


def measure(posts: int = 200, processes: tuple[int, ...] = PROCESSES) -> Report:
    quiet_logs()
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp,
        Azurite() as azurite,
        FakeOpenAI().running_in_thread() as fake,
    ):
        for count in processes:
            results.append(asyncio.run(_wave(azurite, fake, Path(tmp), count, posts)))
    out = Report(f"Scale-out: {posts} posts (echo model) on one queue, {os.cpu_count()} cores")
    base = results[0]["rate"]
    rows = [
        (
            r["processes"],
            round(r["wall"], 2),
            round(r["rate"], 1),
            f"{r['rate'] / base:.2f}x",
            round(r["worker_cores"], 2),
            round(r["per_process"], 2),
            round(r["azurite_cores"], 2),
            round(r["bench_cores"], 2),
            round(r["worker_cores"] + r["azurite_cores"] + r["bench_cores"], 2),
            round(r["machine_cores"], 2),
            round(r["worker_ms"], 1),
            round(r["azurite_ms"], 1),
        )
        for r in results
    ]
    out.add(
        "Cores busy = CPU seconds / wall seconds over the wave; 'bench' is this process (the "
        "fake model and the producer); 'machine busy' counts every process (`/proc/stat`): the "
        "rest is other load on the machine.\n\n"
        + table(
            [
                "workers",
                "seconds",
                "posts/s",
                "vs 1",
                "worker cores",
                "per worker",
                "Azurite cores",
                "bench cores",
                "total cores",
                "machine busy cores",
                "worker CPU ms/post",
                "Azurite CPU ms/post",
            ],
            rows,
        )
    )
    top = max(results, key=lambda r: r["rate"])
    total = top["machine_cores"]
    if total > 0.85 * (os.cpu_count() or 1):
        limit = f"the machine's {os.cpu_count()} cores (busy {total:.2f}, all processes)"
    elif top["per_process"] > 0.85:
        limit = "each worker's event loop (one core per process)"
    elif top["azurite_cores"] > 0.85:
        limit = "Azurite (one node process)"
    else:
        limit = "latency (round trips), not CPU"
    out.add(
        f"Best: {top['processes']} worker(s), {top['rate']:.1f} posts/s; the limit looks like {limit}."
    )
    out.numbers = {"rates": {r["processes"]: r["rate"] for r in results}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posts", type=int, default=200)
    args = parser.parse_args()
    print(measure(args.posts).markdown())


if __name__ == "__main__":
    main()
