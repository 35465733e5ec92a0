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
   rounded up to whole seconds (the queue's visibility delays are whole seconds: 0.5 s waits
   1 s), so it includes the step's own work. Twice: the default schedule (polls within
   seconds of the worker's last activity) and one poll ``--long-delay`` s out (past the warm
   window: the worker is idle and backed off when it falls due).
4. **idle storage requests** for a few ``WORKER_MAX_POLLING_INTERVAL`` values: one worker
   each, counted by queue name from Azurite's ``--debug`` log: the requests of the first
   ``--settle`` s after its last message (warm, then backing off), then the rate per minute
   over ``--idle`` s (idle for long); and the **cold pickup**: one post each to ``--cold``
   more workers per value, sent when they have been idle ``--settle`` + ``--idle`` s since
   a turn (made once phase 2 is done), plus a random part of one polling interval.

Phases 2-4 run at the same time (about 4 min, 19 worker processes). Run: ``python -m bench.latency``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import Report, median, percentile, quiet_logs, table
from bench.harness import (
    ECHO_MODEL,
    QUESTION,
    WEATHER_MODEL,
    Producer,
    WorkerProcess,
    wait_created,
    worker_env,
)
from bench.requests import RequestLog, StorageRequest, bench_table_service
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

IDLE_NS = (1, 5, 30)
POLLING_CAPS = ("5", "10", "30")
DEFAULT_BACKOFF = (0.5, 1.0, 2.0, 3.0, 5.0)
# Seconds after the last message until a worker counts as idle for long (past its warm
# window and the backoff's climb to its cap).
SETTLE = 45.0
LONG_DELAY = 40.0
# The first fields of an Azurite --debug log line: its time and the request's id.
_STAMP = re.compile(r"^(?P<at>\S+) (?P<id>[0-9a-f-]{36}) ")


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
    producer: Producer, fake: FakeOpenAI, log: RequestLog, chat_id: str, idle: float, samples: int
) -> tuple[list[float], tuple[int, int]]:
    """Send to first model call of each post, and the span of Azurite's log they fall in."""
    await _turns(producer, fake, chat_id, 1)  # the last activity before the first idle spell
    start = await log.amark()
    found = []
    for n in range(samples):
        await asyncio.sleep(idle)
        tag = f"[p{idle:g}-{n}-{uuid.uuid4().hex[:6]}]"
        request_id, sent = await producer.post(chat_id, f"{QUESTION} {tag}")
        await producer.reply(request_id, within=120)
        first = _first_call(fake, tag)
        assert first is not None
        found.append(first - sent)
    return found, (start, await log.amark())


class _LogIndex:
    """Azurite's log, read once after the measurements (reading it meanwhile would stall
    the event loop, and with it the timing of every job)."""

    def __init__(self, log: RequestLog) -> None:
        self.requests = log.requests()
        self.stamps: dict[str, float] = {}  # when Azurite began each request, by id
        with log.path.open("rb") as lines:
            for raw in lines:
                match = _STAMP.match(raw.decode("utf-8", "replace"))
                if match is not None and match.group("id") not in self.stamps:
                    at = datetime.fromisoformat(match.group("at").replace("Z", "+00:00"))
                    self.stamps[match.group("id")] = at.timestamp()

    def between(self, span: tuple[int, int], fragment: str) -> list[StorageRequest]:
        start, end = span
        return [
            r
            for r in self.requests
            if start <= r.offset < end and fragment in r.url and r.operation is not None
        ]


def _taken(index: _LogIndex, span: tuple[int, int], queue: str) -> list[float]:
    """For each message the benchmark put on ``queue``, how long until a receive of the
    worker returned messages (the polling's part of the pickup)."""
    stamps = index.stamps
    mine = index.between(span, f"/{queue}/")
    waits = []
    for i, request in enumerate(mine):
        if not (request.is_bench and request.operation == "Messages_Enqueue"):
            continue
        taken = next(
            (
                r
                for r in mine[i + 1 :]
                if not r.is_bench and r.operation == "Messages_Dequeue" and (r.items or 0) > 0
            ),
            None,
        )
        if taken is not None:
            waits.append(stamps[taken.request_id] - stamps[request.request_id])
    return waits


def _received_late(index: _LogIndex, span: tuple[int, int], queue: str) -> list[float]:
    """For each message the worker put on ``queue`` with a delay, how long after it became
    visible a receive of the worker took it (Azurite's own clock both times)."""
    stamps = index.stamps
    mine = [r for r in index.between(span, f"/{queue}/") if not r.is_bench]
    late = []
    for i, request in enumerate(mine):
        delay = re.search(r"visibilitytimeout=(\d+)", request.url)
        if request.operation != "Messages_Enqueue" or delay is None:
            continue
        due = stamps[request.request_id] + int(delay.group(1))
        # The first receive that returned messages once it was visible (one before that took
        # another message).
        taken = next(
            (
                r
                for r in mine[i + 1 :]
                if r.operation == "Messages_Dequeue"
                and (r.items or 0) > 0
                and stamps[r.request_id] >= due - 0.005
            ),
            None,
        )
        if taken is not None:
            late.append(stamps[taken.request_id] - due)
    return late


async def _delayed(
    producer: Producer,
    fake: FakeOpenAI,
    log: RequestLog,
    chat_id: str,
    runs_queue: str,
    background: float,
    schedule: Sequence[float] = DEFAULT_BACKOFF,
    model: str = ECHO_MODEL,
) -> dict[str, Any]:
    await asyncio.sleep(3.0)  # otherwise idle
    start = await log.amark()
    request_id, _ = await producer.post(chat_id, "Say something slowly.")
    await producer.reply(request_id, within=background + max(schedule) + 60)
    end = await log.amark()
    polls = [
        r.at
        for r in fake.requests
        if r.endpoint in ("responses.create", "responses.retrieve") and r.model == model
    ]
    lateness = []
    for i in range(1, len(polls)):
        scheduled = math.ceil(schedule[min(i - 1, len(schedule) - 1)])
        lateness.append(polls[i] - polls[i - 1] - scheduled)
    return {"polls": lateness, "span": (start, end), "queue": runs_queue}


async def _idle_rate(
    log: RequestLog, producer: Producer, suffix: str, settle: float, seconds: float
) -> dict[str, Any]:
    chat_id = f"idle-{suffix}"
    await producer.create(chat_id)
    await wait_created(producer.connection, [chat_id])
    start = await log.amark()
    await asyncio.sleep(settle)
    middle = await log.amark()
    began = time.monotonic()
    await asyncio.sleep(seconds)
    end = await log.amark()
    return {"marks": (start, middle, end), "seconds": time.monotonic() - began, "suffix": suffix}


async def _cold_pickup(
    producer: Producer, fake: FakeOpenAI, log: RequestLog, lead_in: float, idle: float
) -> tuple[float, tuple[int, int]]:
    """One post to a worker idle ``idle`` s since its last turn. The turn comes ``lead_in`` s
    after the start (once the warm pickups are done: fewer warm workers at once)."""
    await asyncio.sleep(lead_in)
    chat_id = f"cold-{uuid.uuid4().hex[:8]}"
    await producer.create(chat_id, instructions="You are a weather bot.")
    await wait_created(producer.connection, [chat_id])
    await _turns(producer, fake, chat_id, 1)  # the last activity (and openai imported)
    await asyncio.sleep(idle)
    start = await log.amark()
    tag = f"[c-{uuid.uuid4().hex[:6]}]"
    request_id, sent = await producer.post(chat_id, f"{QUESTION} {tag}")
    await producer.reply(request_id, within=120)
    first = _first_call(fake, tag)
    assert first is not None
    return first - sent, (start, await log.amark())


async def _run(
    azurite: Azurite,
    fake: FakeOpenAI,
    folder: Path,
    turns: int,
    samples: Sequence[int],
    idle_seconds: float,
    background: float,
    idle_ns: Sequence[float],
    polling_caps: Sequence[str],
    settle: float,
    cold: int,
    long_delay: float,
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
    colds = {
        (cap, n): worker(f"c{cap.replace('.', '')}x{n}", WORKER_MAX_POLLING_INTERVAL=cap)
        for cap in polling_caps
        for n in range(cold)
    }
    long_schedule = (long_delay,)
    delayed = {
        "default": (worker("delay", WORKER_MODEL_API="responses"), DEFAULT_BACKOFF, ECHO_MODEL),
        "long": (
            worker(
                "delaylong",
                WORKER_MODEL_API="responses",
                WORKER_POLL_BACKOFF=",".join(f"{x:g}" for x in long_schedule),
            ),
            long_schedule,
            f"{ECHO_MODEL}-long",
        ),
    }
    everyone = [
        *pickups.values(),
        *caps.values(),
        *colds.values(),
        *(w for w, _, _ in delayed.values()),
    ]
    producers: dict[Any, Producer] = {}
    try:
        for process in everyone:
            process.start()
        for key, process in [
            *pickups.items(),
            *caps.items(),
            *colds.items(),
            *((k, w) for k, (w, _, _) in delayed.items()),
        ]:
            producers[key] = Producer(connection, process.requests_queue)
            await producers[key].__aenter__()
        chats = {n: f"pick{n}-{uuid.uuid4().hex[:6]}" for n in idle_ns}
        delayed_chats = {k: f"delay{k}-{uuid.uuid4().hex[:6]}" for k in delayed}
        for n, chat in chats.items():
            await producers[n].create(chat, instructions="You are a weather bot.")
        for k, chat in delayed_chats.items():
            await producers[k].create(chat, api="responses", chatModel=delayed[k][2])
        await wait_created(connection, [*chats.values(), *delayed_chats.values()])
        lead_in = max(k * (n + 1.5) for k, n in zip(samples, idle_ns, strict=False)) + 5
        jobs = [
            *(
                _pickup(producers[n], fake, log, chats[n], n, samples[i])
                for i, n in enumerate(idle_ns)
            ),
            *(
                _delayed(
                    producers[k],
                    fake,
                    log,
                    delayed_chats[k],
                    w.env["WORKER_RUNS_QUEUE"],
                    background,
                    schedule,
                    model,
                )
                for k, (w, schedule, model) in delayed.items()
            ),
            *(
                _idle_rate(
                    log, producers[c], p.requests_queue.removeprefix("req-"), settle, idle_seconds
                )
                for c, p in caps.items()
            ),
            # A random part of one interval more: the posts fall at any phase of the polls.
            *(
                _cold_pickup(
                    producers[key],
                    fake,
                    log,
                    lead_in,
                    settle + idle_seconds + random.uniform(0, float(key[0])),
                )
                for key in colds
            ),
        ]
        done: list[Any] = list(await asyncio.gather(*jobs))
    finally:
        for producer in producers.values():
            await producer.__aexit__(None, None, None)
        for process in everyone:
            process.stop()
    index = _LogIndex(log)
    queues = {n: p.requests_queue for n, p in producers.items()}
    results["pickup"] = {n: found for n, (found, _) in zip(idle_ns, done, strict=False)}
    results["taken"] = {
        n: _taken(index, span, queues[n]) for n, (_, span) in zip(idle_ns, done, strict=False)
    }
    results["delayed"] = dict(
        zip(delayed, done[len(idle_ns) : len(idle_ns) + len(delayed)], strict=True)
    )
    for found in results["delayed"].values():
        found["received"] = _received_late(index, found["span"], found["queue"])
    rates = done[len(idle_ns) + len(delayed) : len(idle_ns) + len(delayed) + len(caps)]
    results["idle"] = dict(zip(polling_caps, rates, strict=True))
    for rate in rates:
        start, middle, end = rate["marks"]
        counted = [r for r in index.requests if not r.is_bench and f"-{rate['suffix']}" in r.url]
        rate["warm"] = len([r for r in counted if start <= r.offset < middle])
        rate["requests"] = len([r for r in counted if middle <= r.offset < end])
        rate["per_minute"] = rate["requests"] * 60 / rate["seconds"]
    cold_times = done[len(idle_ns) + len(delayed) + len(caps) :]
    for (cap, n), (pickup, span) in zip(colds, cold_times, strict=True):
        results["idle"][cap].setdefault("cold", []).append(pickup)
        taken = _taken(index, span, queues[(cap, n)])
        results["idle"][cap].setdefault("cold_taken", []).extend(taken)
    return results


def measure(
    turns: int = 8,
    samples: Sequence[int] = (4, 3, 2),
    idle_seconds: float = 60.0,
    background: float = 12.0,
    idle_ns: Sequence[float] = IDLE_NS,
    polling_caps: Sequence[str] = POLLING_CAPS,
    settle: float = SETTLE,
    cold: int = 3,
    long_delay: float = LONG_DELAY,
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
                    settle,
                    cold,
                    long_delay,
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
    rows = [
        (f"{n:g} s", len(v), median(v), max(v), median(t), max(t, default=float("nan")))
        for (n, v), t in zip(results["pickup"].items(), results["taken"].values(), strict=True)
    ]
    out.add(
        "Pickup after the worker was idle N s (send to first model call; target p50 <= 0.3 s "
        "within 30 s of the last activity; default `WORKER_MAX_POLLING_INTERVAL` 10 s); taken: "
        "from the send to the worker's receive that returned it (Azurite's log), the polling's "
        "part:\n\n" + table(["idle", "posts", "p50 s", "max s", "taken p50 s", "taken max s"], rows)
    )
    rows = []
    for key, found in results["delayed"].items():
        schedule = "default `0.5,1,2,3,5`" if key == "default" else f"`{long_delay:g}`"
        late, taken = found["polls"], found["received"]
        rows.append(
            (
                schedule,
                len(late),
                max(taken, default=float("nan")),
                ", ".join(f"{x:.2f}" for x in taken),
                median(late),
                max(late, default=float("nan")),
                ", ".join(f"{x:.2f}" for x in late),
            )
        )
    out.add(
        f"Delayed steps: polls of a background response of {background:g} s by "
        "`WORKER_POLL_BACKOFF`, worker otherwise idle. Received late: from the step's visibility "
        "(its send plus the delay in whole seconds) to the receive that took it, on Azurite's "
        "clock (target <= 0.5 s); poll gap late: the gap between two model calls minus that "
        "delay (the step's own work included):\n\n"
        + table(
            [
                "poll schedule",
                "polls",
                "received late max s",
                "each s",
                "poll gap late p50 s",
                "max s",
                "each s",
            ],
            rows,
        )
    )
    rows = [
        (
            f"{cap} s",
            v["warm"],
            round(v["seconds"]),
            v["requests"],
            round(v["per_minute"], 1),
            len(v.get("cold", [])),
            median(v.get("cold", [])),
            max(v.get("cold", []), default=float("nan")),
            median(v.get("cold_taken", [])),
        )
        for cap, v in results["idle"].items()
    ]
    out.add(
        f"Idle storage requests by `WORKER_MAX_POLLING_INTERVAL`: in the first {settle:g} s after "
        f"the last message, then per minute (idle for long; target <= 12/min); cold pickup: "
        f"one post each to {cold} more workers idle {settle + idle_seconds:g} s (plus up to one "
        f"interval, at random) since a turn:\n\n"
        + table(
            [
                "max polling interval",
                f"requests in first {settle:g} s",
                "idle window s",
                "requests",
                "per minute",
                "cold posts",
                "cold pickup p50 s",
                "cold pickup max s",
                "cold taken p50 s",
            ],
            rows,
        )
    )
    worker_overhead = [r["overhead"] for r in results["worker"]]
    received_all = [x for v in results["delayed"].values() for x in v["received"]]
    out.numbers = {
        "overhead_p50": median(worker_overhead),
        "by_hand_overhead_p50": median([r["overhead"] for r in results["by hand"]]),
        "pickup_p50": {n: median(v) for n, v in results["pickup"].items()},
        "taken_p50": {n: median(v) for n, v in results["taken"].items()},
        "delayed_p50": median(results["delayed"]["default"]["polls"]),
        "delayed_long_max": max(results["delayed"]["long"]["polls"], default=float("nan")),
        "received_late_max": max(received_all, default=float("nan")),
        "idle_per_minute": {cap: v["per_minute"] for cap, v in results["idle"].items()},
        "settle_requests": {cap: v["warm"] for cap, v in results["idle"].items()},
        "cold_pickup_p50": {cap: median(v.get("cold", [])) for cap, v in results["idle"].items()},
        "pickup_p95_all": percentile([x for v in results["pickup"].values() for x in v], 95),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--samples", default="4,3,2", help="posts after idle 1, 5 and 30 s")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle counting")
    parser.add_argument("--background", type=float, default=12.0, help="background response s")
    parser.add_argument(
        "--caps", default=",".join(POLLING_CAPS), help="WORKER_MAX_POLLING_INTERVAL values"
    )
    parser.add_argument("--settle", type=float, default=SETTLE, help="s until idle for long")
    parser.add_argument("--cold", type=int, default=3, help="cold workers per polling cap")
    parser.add_argument("--long-delay", type=float, default=LONG_DELAY, help="long poll delay s")
    args = parser.parse_args()
    samples = tuple(int(x) for x in args.samples.split(","))
    report = measure(
        args.turns,
        samples,
        args.idle,
        args.background,
        polling_caps=tuple(args.caps.split(",")),
        settle=args.settle,
        cold=args.cold,
        long_delay=args.long_delay,
    )
    print(report.markdown())


if __name__ == "__main__":
    main()
