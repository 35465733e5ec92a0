"""Turn latency: overhead, pickup after idle, delayed steps, idle polling cost.

Worker processes (``assistant-worker run``, default settings unless said) on one Azurite, the
instant fake model in this process, the weather-bot turn (3 model calls, 2 tool rounds):

1. **turn overhead**: from the turn's first model call (the fake's request time) to its reply's
   arrival at the producer, ``--turns`` turns back to back on one chat. Beside it the
   **by-hand baseline**: the same model calls and the same durable writes (the user message
   with the state row, each answer and tool round as one 2-3 row transaction, the reply on the
   reply queue) with the SDKs directly, no queue hops, same producer.
2. **pickup**: a post sent after the worker has been idle N s (N in 1, 5, 30): from the send to
   the first model call. One worker per N, all at once.
3. **delayed step lateness**: a ``responses`` run whose background response takes
   ``--background`` s, on a worker otherwise idle: each poll is a step sent with the next delay
   of ``WORKER_POLL_BACKOFF``; its lateness is the gap between two polls minus that delay
   (the queue's visibility delays are whole seconds: 0.5 s waits 1 s).
4. **idle storage requests per minute** for a few ``WORKER_MAX_POLLING_INTERVAL`` values: one
   worker each, idle from 5 s after its last message, counted by queue name over ``--idle``
   seconds from Azurite's ``--debug`` log.

Phases 2-4 run at the same time (about 70 s). Run: ``python -m bench.latency``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Report, median, percentile, quiet_logs, table
from bench.harness import QUESTION, WEATHER_MODEL, Producer, WorkerProcess, wait_created, worker_env
from bench.requests import RequestLog, bench_table_service
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

IDLE_NS = (1, 5, 30)
POLLING_CAPS = ("1", "10", "30")
DEFAULT_BACKOFF = (0.5, 1.0, 2.0, 3.0, 5.0)


def _first_call(fake: FakeOpenAI, tag: str) -> float | None:
    times = [
        r.at
        for r in fake.requests
        if r.endpoint == "chat.create"
        and tag in json.dumps((r.json or {}).get("messages", [])[-1:])
    ]
    return min(times) if times else None


async def _turns(
    producer: Producer, fake: FakeOpenAI, chat_id: str, turns: int
) -> list[dict[str, float]]:
    rows = []
    for n in range(turns):
        tag = f"[t{n}-{uuid.uuid4().hex[:6]}]"
        request_id, sent = await producer.post(chat_id, f"{QUESTION} {tag}")
        reply = await producer.reply(request_id, within=60)
        first = _first_call(fake, tag)
        assert first is not None and reply.event.get("status") == "completed", reply.event
        rows.append({"overhead": reply.arrived - first, "pickup": first - sent})
    return rows


async def by_hand(
    connection: str, fake: FakeOpenAI, producer: Producer, turns: int
) -> list[dict[str, float]]:
    """The baseline: the same turns, driven with the SDKs (openai, tables, queues) directly."""
    import openai

    from handlers.tools import load_tools

    tools = load_tools(["worker.devtools.weather"])
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-bench", max_retries=0)
    chat_id = f"hand-{uuid.uuid4().hex[:8]}"
    rows = []
    async with bench_table_service(connection) as service:
        await service.create_table_if_not_exists("BenchByHand")
        table_client = service.get_table_client("BenchByHand")
        seq = 0

        async def write(messages: Sequence[dict[str, Any]]) -> None:
            nonlocal seq
            operations: list[Any] = []
            for message in messages:
                seq += 1
                row = {
                    "PartitionKey": chat_id,
                    "RowKey": f"msg-{seq:08d}",
                    "Body": json.dumps(message),
                }
                operations.append(("upsert", row))
            operations.append(("upsert", {"PartitionKey": chat_id, "RowKey": "state", "Seq": seq}))
            await table_client.submit_transaction(operations)

        history: list[Any] = [{"role": "system", "content": "You are a weather bot."}]
        for n in range(turns):
            tag = f"[h{n}-{uuid.uuid4().hex[:6]}]"
            request_id = f"h-{uuid.uuid4().hex[:12]}"
            sent = time.time()
            user = {"role": "user", "content": f"{QUESTION} {tag}"}
            history.append(user)
            await write([user])
            first = time.time()
            while True:
                completion = await client.chat.completions.create(
                    model=WEATHER_MODEL,
                    messages=history,
                    tools=tools.definitions(),  # type: ignore[arg-type]
                )
                message = completion.choices[0].message
                answer = message.model_dump(exclude_none=True)
                history.append(answer)
                if not message.tool_calls:
                    await write([answer])
                    break
                outputs = []
                for call in message.tool_calls:
                    spec = tools.get(call.function.name)  # type: ignore[union-attr]
                    assert spec is not None
                    output = spec.function(**json.loads(call.function.arguments or "{}"))  # type: ignore[union-attr]
                    outputs.append({"role": "tool", "tool_call_id": call.id, "content": output})
                history.extend(outputs)
                await write([answer, *outputs][:99])
            reply = {
                "type": "assistantReply",
                "id": chat_id,
                "requestId": request_id,
                "status": "completed",
                "content": message.content,
            }
            await producer.broker.send(producer.reply_queue, json.dumps(reply))
            arrived = (await producer.reply(request_id, within=30)).arrived
            rows.append({"overhead": arrived - first, "pickup": first - sent})
    await client.close()
    return rows


async def _pickup(
    producer: Producer, fake: FakeOpenAI, chat_id: str, idle: float, samples: int
) -> list[float]:
    await _turns(producer, fake, chat_id, 1)  # the last activity before the first idle spell
    found = []
    for n in range(samples):
        await asyncio.sleep(idle)
        tag = f"[p{idle:g}-{n}-{uuid.uuid4().hex[:6]}]"
        request_id, sent = await producer.post(chat_id, f"{QUESTION} {tag}")
        await producer.reply(request_id, within=120)
        first = _first_call(fake, tag)
        assert first is not None
        found.append(first - sent)
    return found


async def _delayed(
    producer: Producer, fake: FakeOpenAI, chat_id: str, background: float
) -> list[float]:
    await asyncio.sleep(3.0)  # otherwise idle: the worker has backed off
    request_id, _ = await producer.post(chat_id, "Say something slowly.")
    await producer.reply(request_id, within=background + 60)
    polls = [
        r.at for r in fake.requests if r.endpoint in ("responses.create", "responses.retrieve")
    ]
    lateness = []
    for i in range(1, len(polls)):
        scheduled = DEFAULT_BACKOFF[min(i - 1, len(DEFAULT_BACKOFF) - 1)]
        lateness.append(polls[i] - polls[i - 1] - scheduled)
    return lateness


async def _idle_rate(
    log: RequestLog, producer: Producer, suffix: str, seconds: float
) -> dict[str, float]:
    await producer.create(f"idle-{suffix}")
    await asyncio.sleep(5.0)
    start = await log.amark()
    began = time.monotonic()
    await asyncio.sleep(seconds)
    end = await log.amark()
    elapsed = time.monotonic() - began
    mine = [r for r in log.worker_requests(start, end) if f"-{suffix}" in r.url]
    return {"requests": len(mine), "per_minute": len(mine) * 60 / elapsed, "seconds": elapsed}


async def _run(
    azurite: Azurite,
    fake: FakeOpenAI,
    folder: Path,
    turns: int,
    samples: Sequence[int],
    idle_seconds: float,
    background: float,
    idle_ns: Sequence[float],
    polling_caps: Sequence[str] = POLLING_CAPS,
) -> dict[str, Any]:
    connection = azurite.connection_string
    log = RequestLog(folder / "azurite-debug.log", azurite)
    results: dict[str, Any] = {}

    def worker(name: str, **settings: str) -> WorkerProcess:
        env = worker_env(
            connection, f"{name}{uuid.uuid4().hex[:6]}", base_url=fake.base_url, **settings
        )
        return WorkerProcess(env, folder / f"worker-{name}.log")

    # 1. turn overhead, and the by-hand baseline
    with worker("turns") as main:
        async with Producer(connection, main.requests_queue) as producer:
            chat_id = f"turns-{uuid.uuid4().hex[:8]}"
            await producer.create(chat_id, instructions="You are a weather bot.")
            await wait_created(connection, [chat_id])
            await _turns(producer, fake, chat_id, 1)  # warm-up (first model call imports openai)
            results["worker"] = await _turns(producer, fake, chat_id, turns)
            results["by hand"] = await by_hand(connection, fake, producer, turns)

    # 2-4 at once, one worker each
    fake.background_delay = background
    pickups = {n: worker(f"p{i}") for i, n in enumerate(idle_ns)}
    caps = {
        cap: worker(f"i{cap.replace('.', '')}", WORKER_MAX_POLLING_INTERVAL=cap)
        for cap in polling_caps
    }
    delayed = worker("delay", WORKER_MODEL_API="responses")
    everyone = [*pickups.values(), *caps.values(), delayed]
    try:
        for process in everyone:
            process.start()
        async with Producer(connection, delayed.requests_queue) as delayed_producer:
            producers = {n: Producer(connection, p.requests_queue) for n, p in pickups.items()}
            idle_producers = {c: Producer(connection, p.requests_queue) for c, p in caps.items()}
            for p in [*producers.values(), *idle_producers.values()]:
                await p.__aenter__()
            try:
                chats = {n: f"pick{n}-{uuid.uuid4().hex[:6]}" for n in idle_ns}
                delayed_chat = f"delay-{uuid.uuid4().hex[:6]}"
                for n, chat in chats.items():
                    await producers[n].create(chat, instructions="You are a weather bot.")
                await delayed_producer.create(delayed_chat, api="responses", chatModel="echo-bot")
                await wait_created(connection, [*chats.values(), delayed_chat])
                jobs = [
                    *(
                        _pickup(producers[n], fake, chats[n], n, samples[i])
                        for i, n in enumerate(idle_ns)
                    ),
                    _delayed(delayed_producer, fake, delayed_chat, background),
                    *(
                        _idle_rate(
                            log,
                            idle_producers[c],
                            p.requests_queue.removeprefix("req-"),
                            idle_seconds,
                        )
                        for c, p in caps.items()
                    ),
                ]
                done = await asyncio.gather(*jobs)
            finally:
                for p in [*producers.values(), *idle_producers.values()]:
                    await p.__aexit__(None, None, None)
    finally:
        for process in everyone:
            process.stop()
    results["pickup"] = dict(zip(idle_ns, done[: len(idle_ns)], strict=True))
    results["delayed"] = done[len(idle_ns)]
    results["idle"] = dict(zip(polling_caps, done[len(idle_ns) + 1 :], strict=True))
    return results


def measure(
    turns: int = 8,
    samples: Sequence[int] = (4, 3, 2),
    idle_seconds: float = 30.0,
    background: float = 12.0,
    idle_ns: Sequence[float] = IDLE_NS,
    polling_caps: Sequence[str] = POLLING_CAPS,
) -> Report:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        folder = Path(tmp)
        with (
            Azurite(debug_log=folder / "azurite-debug.log") as azurite,
            FakeOpenAI().running_in_thread() as fake,
        ):
            results = asyncio.run(
                _run(
                    azurite,
                    fake,
                    folder,
                    turns,
                    samples,
                    idle_seconds,
                    background,
                    idle_ns,
                    polling_caps,
                )
            )
    out = Report("Turn latency (instant model)")
    rows: list[tuple[Any, ...]] = []
    for name in ("worker", "by hand"):
        overhead = [r["overhead"] for r in results[name]]
        pickup = [r["pickup"] for r in results[name]]
        warm = (median(pickup), max(pickup)) if name == "worker" else ("-", "-")  # no queue hop
        rows.append((name, len(overhead), median(overhead), max(overhead), *warm))
    out.add(
        "Turn overhead: first model call to the reply's arrival; warm pickup: post sent right "
        "after the previous reply to the first model call (target: overhead p50 <= 0.15 s).\n\n"
        + table(
            [
                "",
                "turns",
                "overhead p50 s",
                "overhead max s",
                "warm pickup p50 s",
                "warm pickup max s",
            ],
            rows,
        )
    )
    rows = [(f"{n:g} s", len(v), median(v), max(v)) for n, v in results["pickup"].items()]
    out.add(
        "Pickup after the worker was idle N s (send to first model call; target p50 <= 0.3 s "
        "within 30 s of the last activity; default `WORKER_MAX_POLLING_INTERVAL` 10 s):\n\n"
        + table(["idle", "posts", "p50 s", "max s"], rows)
    )
    late = results["delayed"]
    out.add(
        f"Delayed steps (polls of a background response of {background:g} s, default "
        f"`WORKER_POLL_BACKOFF`, worker otherwise idle; target <= 0.5 s late): "
        f"{len(late)} polls, lateness p50 {median(late):.2f} s, max {max(late, default=float('nan')):.2f} s "
        f"(each: {', '.join(f'{x:.2f}' for x in late)})."
    )
    rows = [
        (f"{cap} s", round(v["seconds"]), v["requests"], round(v["per_minute"], 1))
        for cap, v in results["idle"].items()
    ]
    out.add(
        "Idle storage requests per minute by `WORKER_MAX_POLLING_INTERVAL` (counted from 5 s "
        "after the last message; target <= 12/min for a worker idle for long):\n\n"
        + table(["max polling interval", "window s", "requests", "per minute"], rows)
    )
    worker_overhead = [r["overhead"] for r in results["worker"]]
    out.numbers = {
        "overhead_p50": median(worker_overhead),
        "by_hand_overhead_p50": median([r["overhead"] for r in results["by hand"]]),
        "pickup_p50": {n: median(v) for n, v in results["pickup"].items()},
        "delayed_p50": median(late),
        "idle_per_minute": {cap: v["per_minute"] for cap, v in results["idle"].items()},
        "pickup_p95_all": percentile([x for v in results["pickup"].values() for x in v], 95),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--samples", default="4,3,2", help="posts after idle 1, 5 and 30 s")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle counting")
    parser.add_argument("--background", type=float, default=12.0, help="background response s")
    args = parser.parse_args()
    samples = tuple(int(x) for x in args.samples.split(","))
    print(measure(args.turns, samples, args.idle, args.background).markdown())


if __name__ == "__main__":
    main()
