"""Open conversations per replica: many background responses in flight on one worker process.

``--posts`` posts (one chat each) on the ``responses`` API, whose background responses take
``--delay`` s at the fake model, through one ``assistant-worker run`` process; for the default
``WORKER_POLL_BACKOFF`` and two other schedules:

- peak RSS of the worker (``VmHWM`` of ``/proc/PID/status``; target < 250 MB at 2,000),
- worker CPU over the whole wave, per run and per poll (``/proc/PID/stat``),
- model API calls per run (creates + retrieves at the fake),
- the delay from each response finishing at the model (its creation + ``--delay``) to its reply
  reaching the producer: p50, p95 (target for the default: p50 <= 3 s, p95 <= 6 s).

Beside them, the Assistants-SDK-sample approach on the same fake: one coroutine per run that
creates the background response and polls it every 500 ms (a child process, so that its memory
and CPU are its own). The frontier is API calls per run against p50/p95 delay.

Run: ``python -m bench.open_conversations`` (``--posts 2000`` for the issue's figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, Report, cpu_seconds, percentile, quiet_logs, status_kib, table
from bench.harness import ECHO_MODEL, Producer, WorkerProcess, wait_created, worker_env
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

SCHEDULES = {
    "default 0.5,1,2,3,5": "0.5,1,2,3,5",
    "sparse 1,2,4,8": "1,2,4,8",
    "dense 0.5,1,1,1,2": "0.5,1,1,1,2",
}
SAMPLE_POLL = 0.5


def _stats(delays: list[float]) -> tuple[float, float, float]:
    return percentile(delays, 50), percentile(delays, 95), max(delays, default=float("nan"))


async def _wave(
    azurite: Azurite,
    fake: FakeOpenAI,
    folder: Path,
    name: str,
    backoff: str,
    chats: list[str],
    delay: float,
    create: bool,
) -> dict[str, Any]:
    """One wave: a post on each of ``chats`` (created first if ``create``: later waves post
    again on the same chats, whose history of one turn changes nothing)."""
    connection = azurite.connection_string
    suffix = uuid.uuid4().hex[:8]
    posts = len(chats)
    env = worker_env(
        connection,
        f"oc{suffix}",
        base_url=fake.base_url,
        model=ECHO_MODEL,
        tools="",
        WORKER_MODEL_API="responses",
        WORKER_POLL_BACKOFF=backoff,
    )
    fake.reset()
    with WorkerProcess(env, folder / f"worker-{suffix}.log") as worker:
        async with Producer(connection, worker.requests_queue, poll_interval=0.05) as producer:
            limiter = asyncio.Semaphore(16)

            async def send(coroutine: Any) -> Any:
                async with limiter:
                    return await coroutine

            if create:
                await asyncio.gather(*(send(producer.create(c, api="responses")) for c in chats))
                await wait_created(connection, chats, within=120 + posts / 5)
            cpu_before = cpu_seconds(worker.pid)
            fake.reset()
            sent = await asyncio.gather(*(send(producer.post(c, f"hello {c}")) for c in chats))
            request_ids = [request_id for request_id, _ in sent]
            await producer.wait_replies(request_ids, within=delay + 120 + posts / 5)
            cpu = cpu_seconds(worker.pid) - cpu_before
            peak_kib = status_kib(worker.pid, "VmHWM")
            created: dict[str, float] = {}
            for record in fake.requests:
                if record.endpoint == "responses.create":
                    chat = ((record.json or {}).get("metadata") or {}).get("chatId")
                    created.setdefault(str(chat), record.at)
            delays = [
                producer.replies[request_id].arrived - (created[chat] + delay)
                for chat, request_id in zip(chats, request_ids, strict=True)
                if chat in created
            ]
            statuses = {producer.replies[r].event.get("status") for r in request_ids}
            assert statuses == {"completed"}, statuses
            polls = fake.calls(endpoint="responses.retrieve")
            calls = fake.calls(endpoint=["responses.create", "responses.retrieve"])
    return {
        "name": name,
        "rss_mb": peak_kib / 1024,
        "cpu_ms_per_run": cpu / posts * 1000,
        "cpu_ms_per_poll": cpu / max(polls, 1) * 1000,
        "calls_per_run": calls / posts,
        "delays": delays,
    }


async def _sample_child(base_url: str, posts: int, delay: float) -> dict[str, Any]:
    """The Assistants SDK samples' way: a coroutine per run, polling every 500 ms."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=2)
    limiter = asyncio.Semaphore(64)  # connection pool: the samples leave it to httpx

    async def one(n: int) -> float:
        async with limiter:
            response = await client.responses.create(
                model=ECHO_MODEL, input=f"hello {n}", background=True, store=True
            )
        created = time.time()
        while response.status in ("queued", "in_progress"):
            await asyncio.sleep(SAMPLE_POLL)
            async with limiter:
                response = await client.responses.retrieve(response.id)
        return time.time() - (created + delay)

    cpu = time.process_time()
    delays = await asyncio.gather(*(one(n) for n in range(posts)))
    cpu = time.process_time() - cpu
    await client.close()
    return {"delays": list(delays), "cpu": cpu, "rss_kib": status_kib(_self_pid(), "VmHWM")}


def _self_pid() -> int:
    import os

    return os.getpid()


def _sample(fake: FakeOpenAI, posts: int, delay: float) -> dict[str, Any]:
    fake.reset()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.open_conversations",
            "--sample-child",
            fake.base_url,
            "--posts",
            str(posts),
            "--delay",
            str(delay),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=delay + 300,
        check=True,
    )
    child = json.loads(done.stdout.strip().splitlines()[-1])
    calls = fake.calls(endpoint=["responses.create", "responses.retrieve"])
    polls = fake.calls(endpoint="responses.retrieve")
    return {
        "name": f"SDK sample (poll every {SAMPLE_POLL:g} s)",
        "rss_mb": child["rss_kib"] / 1024,
        "cpu_ms_per_run": child["cpu"] / posts * 1000,
        "cpu_ms_per_poll": child["cpu"] / max(polls, 1) * 1000,
        "calls_per_run": calls / posts,
        "delays": child["delays"],
    }


def measure(
    posts: int = 300, delay: float = 30.0, schedules: dict[str, str] | None = None
) -> Report:
    quiet_logs()
    schedules = schedules or SCHEDULES
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-open-") as tmp,
        Azurite() as azurite,
        FakeOpenAI(background_delay=delay).running_in_thread() as fake,
    ):
        chats = [f"oc-{uuid.uuid4().hex[:8]}-{n}" for n in range(posts)]
        for n, (name, backoff) in enumerate(schedules.items()):
            wave = _wave(azurite, fake, Path(tmp), name, backoff, chats, delay, create=n == 0)
            rows.append(asyncio.run(wave))
        rows.append(_sample(fake, posts, delay))
    out = Report(f"Open conversations: {posts} background responses of {delay:g} s, one worker")
    body = []
    for row in rows:
        p50, p95, worst = _stats(row["delays"])
        body.append(
            (
                row["name"],
                round(row["calls_per_run"], 1),
                round(p50, 2),
                round(p95, 2),
                round(worst, 2),
                round(row["rss_mb"]),
                round(row["cpu_ms_per_run"], 1),
                round(row["cpu_ms_per_poll"], 2),
            )
        )
    out.add(
        "Delay: from the response finishing at the model (created + delay) to the reply at the "
        "producer. RSS: peak (VmHWM) of the worker process (of the sample's process for the "
        "sample). CPU: the worker's, over the wave.\n\n"
        + table(
            [
                "schedule (WORKER_POLL_BACKOFF)",
                "API calls/run",
                "delay p50 s",
                "delay p95 s",
                "max s",
                "peak RSS MB",
                "CPU ms/run",
                "CPU ms/poll",
            ],
            body,
        )
    )
    sample_calls = rows[-1]["calls_per_run"]
    default = rows[0]
    p50, p95, _ = _stats(default["delays"])
    out.add(
        f"Frontier: the default schedule makes {default['calls_per_run'] / sample_calls:.2f}x the "
        f"sample's API calls (target <= 0.25x) with p50 {p50:.2f} s / p95 {p95:.2f} s (target "
        "<= 3 s / <= 6 s); the rows above are the frontier's points."
    )
    out.numbers = {
        "default_calls_per_run": default["calls_per_run"],
        "sample_calls_per_run": sample_calls,
        "default_p50": p50,
        "default_p95": p95,
        "default_rss_mb": default["rss_mb"],
        "replies": len(default["delays"]),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--delay", type=float, default=30.0, help="background response seconds")
    parser.add_argument("--sample-child", metavar="BASE_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample_child:
        print(json.dumps(asyncio.run(_sample_child(args.sample_child, args.posts, args.delay))))
        return
    print(measure(args.posts, args.delay).markdown())


if __name__ == "__main__":
    main()
