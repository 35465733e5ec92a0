"""Creates against their floor: the worker beside the least I/O a create needs, in the same run.

- ``floor``: a bare asyncio loop with the same SDK: receive 32, one 2-row table transaction per
  message (the state row and the System message), delete; 16 messages in flight.
- ``worker``: the same ``assistantCreate`` payloads through the worker (``open_app`` and
  ``Worker.run_until_idle`` in this process, ``WORKER_CONCURRENCY=16``).

Both on **new chats**, then again on the same ids (**resets** of existing chats). Per message:
Python CPU of this process, and Azurite's CPU (from ``/proc``). Target: worker >= 0.9x the floor.

Keep the message count modest: Azurite scans every stored message on each receive (NOTES).
Run: ``python -m bench.creates --messages 300``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.common import Report, quiet_logs, table, tree_cpu_seconds
from worker.devtools.azurite import Azurite

CONCURRENCY = 16
BATCH = 32
TABLE = "BenchChats"


@dataclass
class Timing:
    seconds: float
    cpu: float  # this process
    azurite_cpu: float
    count: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def create_bodies(ids: list[str]) -> list[str]:
    return [
        json.dumps({"id": chat_id, "instructions": "Be brief.", "collectionName": TABLE})
        for chat_id in ids
    ]


async def fill(connection: str, queue: str, bodies: list[str]) -> None:
    """Put ``bodies`` on ``queue`` (created), 16 sends at a time."""
    from azure.core.exceptions import ResourceExistsError

    from bench.requests import bench_queue_service

    async with bench_queue_service(connection) as service:
        client = service.get_queue_client(queue)
        with contextlib.suppress(ResourceExistsError):
            await client.create_queue()
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def put(body: str) -> None:
            async with semaphore:
                await client.send_message(body)

        await asyncio.gather(*(put(body) for body in bodies))


async def floor(connection: str, queue: str, count: int, table_name: str = "BenchFloor") -> None:
    """Drain ``count`` creates from ``queue``: receive 32, one 2-row transaction, delete."""
    from azure.core.exceptions import ResourceExistsError

    from bench.requests import bench_queue_service, bench_table_service

    async with bench_queue_service(connection) as queues, bench_table_service(connection) as tables:
        client = queues.get_queue_client(queue)
        with contextlib.suppress(ResourceExistsError):
            await tables.create_table(table_name)
        table_client = tables.get_table_client(table_name)
        semaphore = asyncio.Semaphore(CONCURRENCY)
        done = 0

        async def handle(message: Any) -> None:
            async with semaphore:
                payload = json.loads(message.content)
                chat = payload["id"]
                await table_client.submit_transaction(
                    [
                        ("upsert", {"PartitionKey": chat, "RowKey": "state", "Total": 1}),
                        (
                            "upsert",
                            {
                                "PartitionKey": chat,
                                "RowKey": "msg-00000001",
                                "Role": "system",
                                "Content": payload["instructions"],
                            },
                        ),
                    ]
                )
                await client.delete_message(message.id, message.pop_receipt)

        while done < count:
            pager = client.receive_messages(messages_per_page=BATCH, max_messages=BATCH)
            batch = [m async for m in pager]
            if not batch:
                await asyncio.sleep(0.01)
                continue
            await asyncio.gather(*(handle(message) for message in batch))
            done += len(batch)


async def through_worker(connection: str, queue_suffix: str, count: int) -> None:
    """Drain ``count`` creates through the worker, in this process."""
    from worker.app import open_app
    from worker.config.settings import Settings

    settings = Settings.from_env(
        {
            "AzureWebJobsStorage": connection,
            "WORKER_REQUESTS_QUEUE": f"creq-{queue_suffix}",
            "WORKER_RUNS_QUEUE": f"cruns-{queue_suffix}",
            "WORKER_DEADLINES_QUEUE": f"cdl-{queue_suffix}",
            "WORKER_CONCURRENCY": str(CONCURRENCY),
            "WORKER_MAX_POLLING_INTERVAL": "0.1",
        }
    )
    async with open_app(settings) as app:
        await app.stores.get("AzureWebJobsStorage", TABLE)  # table creation is not timed
        before = app.worker.stats["completed"]
        await app.worker.run_until_idle()
        done = app.worker.stats["completed"] - before
        assert done == count, app.worker.stats


def _timed(azurite: Azurite, run: Any, count: int) -> Timing:
    azurite_before = tree_cpu_seconds(azurite.pid)
    cpu = time.process_time()
    began = time.perf_counter()
    asyncio.run(run())
    return Timing(
        seconds=time.perf_counter() - began,
        cpu=time.process_time() - cpu,
        azurite_cpu=tree_cpu_seconds(azurite.pid) - azurite_before,
        count=count,
    )


def _import_before_timing() -> None:
    """Load the modules both sides use before the clock starts: a worker imports them once at
    start, not per message (the worker's alone, OpenAI's SDK among them, take ~0.7 s)."""
    import azure.data.tables.aio
    import azure.storage.queue.aio  # noqa: F401

    import worker.app  # noqa: F401


def measure(messages: int = 300) -> Report:
    quiet_logs()
    _import_before_timing()
    results: dict[tuple[str, str], Timing] = {}
    with Azurite() as azurite:
        connection = azurite.connection_string
        ids = [f"c-{uuid.uuid4().hex[:12]}" for _ in range(messages)]
        bodies = create_bodies(ids)
        floor_queue = f"cfloor-{uuid.uuid4().hex[:8]}"
        suffix = uuid.uuid4().hex[:8]
        for case in ("new chats", "resets"):
            asyncio.run(fill(connection, floor_queue, bodies))
            results[(case, "floor")] = _timed(
                azurite, lambda: floor(connection, floor_queue, messages), messages
            )
            asyncio.run(fill(connection, f"creq-{suffix}", bodies))
            results[(case, "worker")] = _timed(
                azurite, lambda: through_worker(connection, suffix, messages), messages
            )
    out = Report("Creates against the floor")
    rows = []
    ratios = {}
    for case in ("new chats", "resets"):
        reference = results[(case, "floor")]
        for name in ("floor", "worker"):
            t = results[(case, name)]
            ratio = t.rate / reference.rate
            if name == "worker":
                ratios[case] = ratio
            rows.append(
                (
                    case,
                    name,
                    t.count,
                    round(t.seconds, 2),
                    round(t.rate),
                    f"{ratio:.2f}x",
                    round(t.cpu / t.count * 1000, 1),
                    round(t.azurite_cpu / t.count * 1000, 1),
                )
            )
    out.add(
        f"{messages} `assistantCreate` messages per row, 16 in flight, same Azurite, same run "
        "(target: worker >= 0.9x the floor; stretch > 1.0x).\n\n"
        + table(
            [
                "case",
                "who",
                "messages",
                "seconds",
                "msg/s",
                "vs floor",
                "Python CPU ms/msg",
                "Azurite CPU ms/msg",
            ],
            rows,
        )
    )
    out.add(
        "Floor ratios: "
        + ", ".join(f"{case} **{ratio:.2f}x**" for case, ratio in ratios.items())
        + " (issue 7 measured 0.44x on new chats)."
    )
    out.numbers = {"ratio_new": ratios["new chats"], "ratio_reset": ratios["resets"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=300, help="creates per scenario")
    args = parser.parse_args()
    print(measure(args.messages).markdown())


if __name__ == "__main__":
    main()
