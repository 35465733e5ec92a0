"""Runs through the worker against the same conversations driven by hand, in the same run.

- ``baseline``: the weather conversation (3 model calls, 3 tool calls) driven directly with
  the openai client against the fake model, 16 conversations at a time: the model's share.
- ``worker``: the same conversations as posts through the queues, with every step stored in
  Table Storage (Azurite) and continued through ``assistant-runs``.
The difference is the worker's price for durability: per-step storage and queue round trips.

Run with ``make bench`` (``python -m bench.runs --chats 40``).
"""

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import openai
import structlog

from handlers.tools import load_tools
from worker.app import open_app
from worker.config.settings import Settings
from worker.devtools.azurite import Azurite
from worker.testing import FakeOpenAI

CONCURRENCY = 16
QUESTION = "What's the weather like right now in my favorite city?"
TOOLS = load_tools(["worker.devtools.weather"])


async def by_hand(base_url: str, chats: int) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    limiter = asyncio.Semaphore(CONCURRENCY)

    async def conversation() -> None:
        async with limiter:
            messages: list[Any] = [{"role": "user", "content": QUESTION}]
            while True:
                reply = await client.chat.completions.create(
                    model="weather-bot",
                    messages=messages,
                    tools=TOOLS.definitions(),  # type: ignore[arg-type]
                )
                message = reply.choices[0].message
                if not message.tool_calls:
                    return
                messages.append(message.model_dump(exclude_none=True))
                for call in message.tool_calls:
                    spec = TOOLS.get(call.function.name)  # type: ignore[union-attr]
                    assert spec is not None
                    output = spec.function(**json.loads(call.function.arguments or "{}"))  # type: ignore[union-attr]
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": output})

    started = time.perf_counter()
    await asyncio.gather(*(conversation() for _ in range(chats)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed


async def through_worker(connection: str, base_url: str, chats: int) -> float:
    suffix = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {
            "AzureWebJobsStorage": connection,
            "WORKER_REQUESTS_QUEUE": f"rreq-{suffix}",
            "WORKER_RUNS_QUEUE": f"rruns-{suffix}",
            "WORKER_CONCURRENCY": str(CONCURRENCY),
            "WORKER_MAX_POLLING_INTERVAL": "0.1",
            "OPENAI_BASE_URL": base_url,
            "OPENAI_API_KEY": "sk-bench",
            "CHAT_MODEL_DEPLOYMENT_NAME": "weather-bot",
        }
    )
    ids = [f"bench-{suffix}-{n}" for n in range(chats)]
    async with open_app(settings, tools=TOOLS) as app:
        await app.broker.ensure_queues([settings.requests_queue])
        for chat_id in ids:
            await app.broker.send(settings.requests_queue, json.dumps({"id": chat_id}))
        await app.worker.run_until_idle()  # the creates are not timed
        for chat_id in ids:
            await app.broker.send(
                settings.requests_queue, json.dumps({"id": chat_id, "userMessage": QUESTION})
            )
        started = time.perf_counter()
        await app.worker.run_until_idle()
        elapsed = time.perf_counter() - started
        store = await app.stores.get("AzureWebJobsStorage", "ChatState")
        for chat_id in ids:
            [run] = await store.runs(chat_id)
            assert run.status == "completed", (chat_id, run.status, run.error)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=40, help="conversations per scenario")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with Azurite() as azurite, FakeOpenAI().running_in_thread() as fake:
        hand = asyncio.run(by_hand(fake.base_url, args.chats))
        worker = asyncio.run(through_worker(azurite.connection_string, fake.base_url, args.chats))
    print("| scenario | runs | seconds | runs/s | vs baseline |")
    print("|----------|-----:|--------:|-------:|------------:|")
    print(f"| baseline | {args.chats} | {hand:.2f} | {args.chats / hand:.1f} | - |")
    print(
        f"| worker   | {args.chats} | {worker:.2f} | {args.chats / worker:.1f} | {hand / worker:.2f}x |"
    )
    steps = 6  # per run: 3 model calls and 2 tool rounds, plus the run's start
    print(f"\nworker overhead: {(worker - hand) / args.chats * 1000 / steps:.0f} ms per step "
          f"(~{steps} stored steps per run; same fake model, same concurrency)")  # fmt: skip


if __name__ == "__main__":
    main()
