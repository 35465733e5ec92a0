"""Webhooks instead of polling: open background responses on one worker, and the receiver.

``--posts`` posts (one chat each) on the ``responses`` API, whose background responses take
``--delay`` s at the fake model, through one ``assistant-worker run`` process, three ways:

- **webhooks**: ``WORKER_WEBHOOK_SECRETS`` set, the fake sends a signed webhook when each
  response ends; polls only on the safety net (``WORKER_WEBHOOK_POLL_BACKOFF``, 10, 30, 60 s);
- **polling only**: no webhooks, the default ``WORKER_POLL_BACKOFF`` (today's figures);
- **webhooks, 10 % dropped**: the fake drops one webhook in ten (seeded): those runs wait for
  the safety-net poll.

For each: the delay from a response finishing at the model (its creation + ``--delay``) to its
reply reaching the producer (p50, p95, max; target with webhooks p50 <= 0.5 s, p95 <= 1.5 s),
model API calls per run (creates + retrieves at the fake; target <= 3), peak RSS of the worker
(target < 250 MB), and the worker's CPU. The fake records how long the worker took to answer
each delivery.

Then **the receiver**: ``--rate`` signed deliveries a second for ``--seconds`` s to the same
worker (open loop: each is sent on schedule, whatever the earlier ones do), each naming a
response of a finished run with a webhook-id of its own, so each is verified, looked up and its
run read from the table; the answer time per delivery (target p99 <= 0.2 s at 500/s).

Run: ``python -m bench.webhooks`` (``--posts 2000`` for the issue's figure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from standardwebhooks.webhooks import Webhook

from bench.common import (
    REPO_ROOT,
    Report,
    cpu_seconds,
    percentile,
    quiet_logs,
    status_kib,
    table,
)
from bench.harness import ECHO_MODEL, Producer, WorkerProcess, wait_created, worker_env
from bench.requests import bench_queue_service
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

SECRET = "whsec_" + base64.b64encode(b"bench webhook signing key, not a secret").decode()
PATH = "/webhooks/openai"
# (name, webhooks on, share of webhooks dropped)
MODES: tuple[tuple[str, bool, float], ...] = (
    ("webhooks", True, 0.0),
    ("polling only (WORKER_POLL_BACKOFF 0.5,1,2,3,5)", False, 0.0),
    ("webhooks, 10 % dropped", True, 0.1),
)
SEED = 17


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stats(values: list[float]) -> tuple[float, float, float]:
    return percentile(values, 50), percentile(values, 95), max(values, default=float("nan"))


async def _receiver_load(
    url: str, response_ids: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    """``rate`` deliveries a second for ``seconds`` s, open loop; answer times and statuses."""
    count = int(rate * seconds)
    signer = Webhook(SECRET)
    deliveries: list[tuple[bytes, dict[str, str]]] = []
    now = time.time()
    for n in range(count):
        body = json.dumps(
            {
                "id": f"evt_{n}",
                "object": "event",
                "created_at": int(now),
                "type": "response.completed",
                "data": {"id": response_ids[n % len(response_ids)]},
            }
        ).encode()
        webhook_id = f"wh_bench_{uuid.uuid4().hex}"
        stamp = time.time()
        headers = {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(stamp)),
            "webhook-signature": signer.sign(webhook_id, _datetime(stamp), body),
        }
        deliveries.append((body, headers))
    answers: list[float] = [float("nan")] * count
    statuses: dict[int, int] = {}
    lateness: list[float] = []
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int, body: bytes, headers: dict[str, str]) -> None:
            started = time.monotonic()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            answers[n] = time.monotonic() - started
            statuses[status] = statuses.get(status, 0) + 1

        tasks = []
        began = time.monotonic()
        for n, (body, headers) in enumerate(deliveries):
            due = began + n / rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            lateness.append(max(time.monotonic() - due, 0.0))
            tasks.append(asyncio.create_task(one(n, body, headers)))
        await asyncio.gather(*tasks)
        took = time.monotonic() - began
    return {
        "sent": count,
        "achieved_rate": count / took,
        "answers": answers,
        "statuses": statuses,
        "send_lateness_p99": percentile(lateness, 99),
    }


def _answer_row(
    name: str, statuses: dict[int, int] | None, answers: list[float], load: dict[str, Any] | None
) -> tuple[Any, ...]:
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) if statuses else ""
    return (
        name,
        codes or str(len(answers)),
        round(percentile(answers, 50) * 1000, 1),
        round(percentile(answers, 95) * 1000, 1),
        round(percentile(answers, 99) * 1000, 1),
        round(max(answers, default=float("nan")) * 1000, 1),
        round(load["cpu_s"], 1) if load else "-",
    )


def _datetime(stamp: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(stamp, UTC)


async def _wave(
    azurite: Azurite,
    fake: FakeOpenAI,
    folder: Path,
    mode: tuple[str, bool, float],
    chats: list[str],
    delay: float,
    *,
    create: bool,
    load: tuple[float, float] | None,
) -> dict[str, Any]:
    name, webhooks, drop = mode
    connection = azurite.connection_string
    suffix = uuid.uuid4().hex[:8]
    posts = len(chats)
    port = _free_port()
    settings = {"WORKER_MODEL_API": "responses"}
    if webhooks:
        settings.update(
            WORKER_WEBHOOK_SECRETS=SECRET,
            WORKER_WEBHOOK_PORT=str(port),
            WORKER_HTTP_HOST="127.0.0.1",
        )
    env = worker_env(
        connection, f"wh{suffix}", base_url=fake.base_url, model=ECHO_MODEL, tools="", **settings
    )
    fake.reset()
    fake.stop_webhooks()
    url = f"http://127.0.0.1:{port}{PATH}"
    result: dict[str, Any] = {"name": name}
    with WorkerProcess(env, folder / f"worker-{suffix}.log") as worker:
        async with Producer(connection, worker.requests_queue, poll_interval=0.05) as producer:
            limiter = asyncio.Semaphore(16)

            async def send(coroutine: Any) -> Any:
                async with limiter:
                    return await coroutine

            if create:
                await asyncio.gather(*(send(producer.create(c, api="responses")) for c in chats))
                await wait_created(connection, chats, within=120 + posts / 5)
            fake.reset()
            if webhooks:
                fake.configure_webhooks(url, SECRET, drop_rate=drop, seed=SEED)
            cpu_before = cpu_seconds(worker.pid)
            sent = await asyncio.gather(*(send(producer.post(c, f"hello {c}")) for c in chats))
            request_ids = [request_id for request_id, _ in sent]
            await producer.wait_replies(request_ids, within=delay + 180 + posts / 5)
            result["cpu_ms_per_run"] = (cpu_seconds(worker.pid) - cpu_before) / posts * 1000
            result["rss_mb"] = status_kib(worker.pid, "VmHWM") / 1024
            created: dict[str, float] = {}
            for record in fake.requests:
                if record.endpoint == "responses.create":
                    chat = ((record.json or {}).get("metadata") or {}).get("chatId")
                    created.setdefault(str(chat), record.at)
            result["delays"] = [
                producer.replies[request_id].arrived - (created[chat] + delay)
                for chat, request_id in zip(chats, request_ids, strict=True)
                if chat in created
            ]
            statuses = {producer.replies[r].event.get("status") for r in request_ids}
            assert statuses == {"completed"}, statuses
            calls = fake.calls(endpoint=["responses.create", "responses.retrieve"])
            result["calls_per_run"] = calls / posts
            deliveries = fake.webhook_deliveries
            result["dropped"] = sum(1 for d in deliveries if d.dropped)
            result["answered_in"] = [t for d in deliveries for t in d.answered_in]
        reply_queue = producer.reply_queue
        if load is not None and webhooks:
            # From a process of its own: the producer's reply reads and the fake's thread
            # share this one's event loop and interpreter lock.
            ids = [d.response_id for d in deliveries]
            cpu_before = cpu_seconds(worker.pid)
            result["load"] = _load_child(folder, url, ids, *load)
            result["load"]["cpu_s"] = cpu_seconds(worker.pid) - cpu_before
            result["load"]["distinct"] = len(set(ids))
            result["load_rss_mb"] = status_kib(worker.pid, "VmHWM") / 1024
    # Azurite scans every stored message on each queue operation: what this wave leaves (a
    # watchdog per run, delayed polls) would slow the next one down.
    work = [env["WORKER_REQUESTS_QUEUE"], env["WORKER_RUNS_QUEUE"], env["WORKER_DEADLINES_QUEUE"]]
    await _drop_queues(connection, [*work, *(f"{q}-poison" for q in work), reply_queue])
    return result


async def _drop_queues(connection: str, names: list[str]) -> None:
    service = bench_queue_service(connection)
    async with service:
        for name in names:
            with contextlib.suppress(Exception):
                await service.delete_queue(name)


def _load_child(
    folder: Path, url: str, response_ids: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    ids_file = folder / f"load-{uuid.uuid4().hex[:6]}.json"
    ids_file.write_text(json.dumps(response_ids))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.webhooks",
            "--load-child",
            url,
            str(ids_file),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=seconds * 4 + 120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["statuses"] = {int(k): v for k, v in result["statuses"].items()}
    return result


def measure(
    posts: int = 300,
    delay: float = 30.0,
    rate: float = 500.0,
    seconds: float = 10.0,
    modes: tuple[tuple[str, bool, float], ...] = MODES,
) -> Report:
    quiet_logs()
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp,
        Azurite() as azurite,
        FakeOpenAI(background_delay=delay).running_in_thread() as fake,
    ):
        chats = [f"wh-{uuid.uuid4().hex[:8]}-{n}" for n in range(posts)]
        for n, mode in enumerate(modes):
            wave = _wave(azurite, fake, Path(tmp), mode, chats, delay, create=n == 0, load=None)
            rows.append(asyncio.run(wave))
        # The receiver's load: runs this worker finished on its safety-net poll (every webhook
        # dropped), so that their responses are known to it and not yet dealt with.
        fake.background_delay = 1.0
        receiver = _wave(
            azurite,
            fake,
            Path(tmp),
            ("receiver", True, 1.0),
            chats,
            1.0,
            create=False,
            load=(rate, seconds),
        )
        loaded = asyncio.run(receiver)
    out = Report(f"Webhooks: {posts} background responses of {delay:g} s, one worker")
    body = []
    for row in rows:
        p50, p95, worst = _stats(row["delays"])
        body.append(
            (
                row["name"],
                round(row["calls_per_run"], 2),
                round(p50, 2),
                round(p95, 2),
                round(worst, 2),
                round(row["rss_mb"]),
                round(row["cpu_ms_per_run"], 1),
                f"{row['dropped']}" if row["name"] != MODES[1][0] else "-",
            )
        )
    out.add(
        "Delay: from the response finishing at the model (created + delay) to the reply at the "
        "producer. API calls: creates + retrieves at the fake, per run. RSS: peak (VmHWM) of "
        "the worker. CPU: the worker's, over the wave. Targets with webhooks: p50 <= 0.5 s, "
        "p95 <= 1.5 s, <= 3 calls per run, < 250 MB.\n\n"
        + table(
            [
                "mode",
                "API calls/run",
                "delay p50 s",
                "delay p95 s",
                "max s",
                "peak RSS MB",
                "CPU ms/run",
                "webhooks dropped",
            ],
            body,
        )
    )
    first = rows[0]
    answered = first["answered_in"]
    first["load"] = loaded["load"]
    numbers: dict[str, Any] = {
        "replies": len(first["delays"]),
        "webhooks_p50": _stats(first["delays"])[0],
        "webhooks_p95": _stats(first["delays"])[1],
        "webhooks_calls_per_run": first["calls_per_run"],
        "webhooks_rss_mb": first["rss_mb"],
        "polling_p95": _stats(rows[1]["delays"])[1] if len(rows) > 1 else float("nan"),
        "delivery_answer_p99": percentile(answered, 99),
    }
    load = first.get("load")
    if load is not None:
        distinct = load["distinct"]
        everything = [a for a in load["answers"] if a == a]
        stored = [a for a in load["answers"][:distinct] if a == a]  # the first per response
        out.add(
            f"The receiver: {load['sent']} signed deliveries at {rate:g}/s (achieved "
            f"{load['achieved_rate']:.0f}/s, sent from a process of its own) to one worker, "
            f"each under a webhook-id of its own and naming in turn one of {distinct} responses "
            "of runs this worker created and finished on their safety-net poll (their webhooks "
            "dropped). Each is verified and answered at once; the first delivery for each "
            "response is then looked up and its run read from the table (`finished`), the later "
            "ones are known (`duplicate`). Answer time: from the request sent to the answer "
            "read. Beside it, the answers to the fake's own deliveries during the webhooks "
            "wave.\n\n"
            + table(
                ["deliveries", "answers", "p50 ms", "p95 ms", "p99 ms", "max ms", "worker CPU s"],
                [
                    _answer_row(f"all, at {rate:g}/s", load["statuses"], everything, load),
                    _answer_row(f"the first {distinct} (storage read)", None, stored, None),
                    _answer_row("the webhooks wave's own", None, answered, None),
                ],
            )
        )
        numbers["load_p99"] = percentile(everything, 99)
        numbers["load_stored_p99"] = percentile(stored, 99)
        numbers["load_statuses"] = load["statuses"]
        numbers["load_rate"] = load["achieved_rate"]
    out.numbers = numbers
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--delay", type=float, default=30.0, help="background response seconds")
    parser.add_argument("--rate", type=float, default=500.0, help="receiver deliveries a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="receiver load duration")
    parser.add_argument("--load-child", nargs=2, metavar=("URL", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        url, ids_file = args.load_child
        ids = json.loads(Path(ids_file).read_text())
        print(json.dumps(asyncio.run(_receiver_load(url, ids, args.rate, args.seconds))))
        return
    print(measure(args.posts, args.delay, args.rate, args.seconds).markdown())


if __name__ == "__main__":
    main()
