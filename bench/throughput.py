"""Throughput of the worker on Azurite, against baselines measured in the same run.

Scenarios (each on fresh queues of one Azurite):
- ``baseline``: the least I/O a create needs, by hand: receive in batches of 32, one 2-row table
  transaction per message, delete; 16 at a time (``bench.creates.floor``, which also compares
  resets and CPU per message).
- ``worker``: the same number of extension create payloads through ``Worker.run_until_idle``.
- ``loop only``: the worker loop on the in-memory broker with a no-op handler: its own
  overhead per message, without any I/O.

Run with ``make bench`` (or ``python -m bench.throughput --messages 300``). Keep the message
count modest: Azurite scans every stored message on each receive (see NOTES), which would
measure the emulator rather than the worker.
"""

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from azure.storage.queue.aio import QueueServiceClient

from bench.creates import floor
from worker.app import open_app
from worker.config.settings import Settings
from worker.devtools.azurite import Azurite
from worker.loop.handling import HandlerRegistry, HandlerResult, MessageContext
from worker.loop.worker import Worker
from worker.queues.memory import MemoryBroker

CONCURRENCY = 16


async def fill(connection: str, queue: str, bodies: list[str]) -> None:
    async with QueueServiceClient.from_connection_string(connection) as service:
        client = service.get_queue_client(queue)
        await client.create_queue()
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def put(body: str) -> None:
            async with semaphore:
                await client.send_message(body)

        await asyncio.gather(*(put(body) for body in bodies))


def create_bodies(count: int) -> list[str]:
    return [
        json.dumps(
            {
                "id": f"bench-{uuid.uuid4().hex[:12]}",
                "instructions": "Be brief.",
                "collectionName": "BenchChats",
            }
        )
        for _ in range(count)
    ]


async def baseline(connection: str, count: int) -> float:
    """The floor of ``bench.creates`` (receive 32, one 2-row transaction, delete; 16 at once)."""
    queue = f"base-{uuid.uuid4().hex[:8]}"
    await fill(connection, queue, create_bodies(count))
    started = time.perf_counter()
    await floor(connection, queue, count, "BenchBaseline")
    return time.perf_counter() - started


async def through_worker(connection: str, count: int) -> float:
    suffix = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {
            "AzureWebJobsStorage": connection,
            "WORKER_REQUESTS_QUEUE": f"breq-{suffix}",
            "WORKER_RUNS_QUEUE": f"bruns-{suffix}",
            "WORKER_CONCURRENCY": str(CONCURRENCY),
            "WORKER_MAX_POLLING_INTERVAL": "0.1",
        }
    )
    await fill(connection, settings.requests_queue, create_bodies(count))
    async with open_app(settings) as app:
        await app.stores.get("AzureWebJobsStorage", "BenchChats")  # table creation is not timed
        started = time.perf_counter()
        await app.worker.run_until_idle()
        elapsed = time.perf_counter() - started
        assert app.worker.stats["completed"] == count, app.worker.stats
    return elapsed


async def loop_only(count: int) -> float:
    async def noop(message: Any, context: MessageContext) -> HandlerResult:
        return HandlerResult(note="ok")

    broker = MemoryBroker()
    settings = Settings.from_env({"WORKER_CONCURRENCY": str(CONCURRENCY)})
    for body in create_bodies(count):
        broker.queue(settings.requests_queue).put(body)
    worker = Worker(broker, HandlerRegistry(requests={"assistantCreate": noop}, runs={}), settings)
    started = time.perf_counter()
    await worker.run_until_idle()
    return time.perf_counter() - started


def row(name: str, count: int, seconds: float, reference: float | None) -> str:
    rate = count / seconds
    ratio = f"{(reference / seconds):.2f}x" if reference else "-"
    return f"| {name:<10} | {count:>8} | {seconds:>8.2f} | {rate:>9.0f} | {ratio:>13} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=300, help="creates per Azurite scenario")
    parser.add_argument("--loop-messages", type=int, default=5000, help="messages for 'loop only'")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    timed: list[tuple[str, int, Callable[[], Coroutine[Any, Any, float]]]] = []
    with Azurite() as azurite:
        connection = azurite.connection_string
        timed = [
            ("baseline", args.messages, lambda: baseline(connection, args.messages)),
            ("worker", args.messages, lambda: through_worker(connection, args.messages)),
        ]
        results = [(name, count, asyncio.run(measure())) for name, count, measure in timed]
    results.append(("loop only", args.loop_messages, asyncio.run(loop_only(args.loop_messages))))
    reference = results[0][2]
    print("| scenario   | messages |  seconds |    msg/s | vs baseline   |")
    print("|------------|---------:|---------:|---------:|--------------:|")
    for name, count, seconds in results:
        print(row(name, count, seconds, reference if name == "worker" else None))
    print(
        f"\nworker throughput is {(reference / results[1][2]) * 100:.0f}% of the hand-written baseline "
        "(same Azurite, same concurrency)"
    )


if __name__ == "__main__":
    main()
