"""The loop's polling on the in-memory broker, with the default 10 s polling cap: burst mode
still ends at once, the worker wakes for the messages it delayed itself, and nothing is
received while every slot is busy. The schedule itself is tested in test_polling."""

import asyncio
import json
import random
import time
from typing import Any

from schemas import AssistantCreate
from tests.support.env import wait_until
from worker.config.settings import Settings
from worker.loop.errors import TransientError
from worker.loop.handling import HandlerRegistry, HandlerResult, MessageContext, Send
from worker.loop.worker import Worker
from worker.queues.memory import MemoryBroker
from worker.queues.polling import PollSchedule, policies

SETTINGS = Settings.from_env({"WORKER_CONCURRENCY": "4", "OPENAI_API_KEY": "sk-test"})
REQUESTS = SETTINGS.requests_queue
assert SETTINGS.max_polling_interval == 10.0


class Calls:
    """A requests handler that records when each chat id ran and does what it is told."""

    def __init__(self, behaviour: dict[str, Any] | None = None) -> None:
        self.at: list[tuple[str, float]] = []
        self.behaviour = behaviour or {}

    async def __call__(self, message: AssistantCreate, context: MessageContext) -> HandlerResult:
        self.at.append((message.id, time.monotonic()))
        action = self.behaviour.get(message.id)
        if callable(action):
            result = await action(message, context)
            assert isinstance(result, HandlerResult)
            return result
        return HandlerResult(note="ok")

    def times(self, chat_id: str) -> list[float]:
        return [at for chat, at in self.at if chat == chat_id]


def make_worker(handler: Any, broker: MemoryBroker, *, warm: bool = True) -> Worker:
    registry = HandlerRegistry(requests={"assistantCreate": handler}, runs={})
    worker = Worker(broker, registry, SETTINGS, rng=random.Random(1))
    if not warm:
        # No warm window: what is polled for a delayed message is the wake-up, not the
        # frequent polling that follows any activity.
        worker._polls = PollSchedule(
            policies(
                runs=SETTINGS.runs_queue,
                deadlines=SETTINGS.deadlines_queue,
                requests=REQUESTS,
                max_polling_interval=SETTINGS.max_polling_interval,
            ),
            time.monotonic(),
            random.Random(1),
            warm_window=0.0,
        )
    return worker


def put(broker: MemoryBroker, chat_id: str) -> None:
    broker.queue(REQUESTS).put(json.dumps({"id": chat_id}))


def test_burst_mode_ends_at_once_on_empty_queues_and_after_the_last_message() -> None:
    broker = MemoryBroker()
    began = time.monotonic()
    asyncio.run(make_worker(Calls(), broker).run_until_idle())
    assert time.monotonic() - began < 1.0
    put(broker, "a")
    handler = Calls()
    began = time.monotonic()
    asyncio.run(make_worker(handler, broker).run_until_idle())
    assert [chat for chat, _ in handler.at] == ["a"]
    assert time.monotonic() - began < 1.0


def test_a_message_sent_with_a_delay_wakes_the_worker_when_it_is_due() -> None:
    """The follow-up is due 3.5 s out; backing off from 0.1 s the worker would poll at about
    3.1 and 6.3 s: it polls at the due time instead."""
    broker = MemoryBroker()
    delay = 3.5

    async def later(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        return HandlerResult(note="ok", effects=(Send(REQUESTS, {"id": "b"}, delay=delay),))

    handler = Calls({"a": later})
    worker = make_worker(handler, broker, warm=False)
    put(broker, "a")

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: bool(handler.times("b")), 10, "the delayed message")
        worker.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    [sent], [received] = handler.times("a"), handler.times("b")
    assert delay <= received - sent < delay + 0.3


def test_a_retried_message_wakes_the_worker_when_it_is_visible_again() -> None:
    broker = MemoryBroker()
    attempts = 0

    async def flaky(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TransientError("busy", retry_after=2.5)
        return HandlerResult(note="ok")

    handler = Calls({"a": flaky})
    worker = make_worker(handler, broker, warm=False)
    put(broker, "a")

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: worker.stats["completed"] == 1, 10, "the retry")
        worker.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    first, second = handler.times("a")
    assert 2.5 <= second - first < 2.8


def test_nothing_is_received_while_every_slot_is_busy() -> None:
    broker = MemoryBroker()
    settings = SETTINGS.with_values(concurrency=1)
    release = asyncio.Event()
    receives: list[float] = []
    queue = broker.queue(REQUESTS)
    original = queue.receive

    async def counted(max_messages: int, visibility_timeout: float) -> Any:
        receives.append(time.monotonic())
        return await original(max_messages, visibility_timeout)

    queue.receive = counted  # type: ignore[method-assign]

    async def blocked(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        await release.wait()
        return HandlerResult(note="ok")

    handler = Calls({"a": blocked})
    registry = HandlerRegistry(requests={"assistantCreate": handler}, runs={})
    worker = Worker(broker, registry, settings, rng=random.Random(1))
    put(broker, "a")
    put(broker, "b")

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: bool(handler.times("a")), 5, "the first message")
        busy = len(receives)
        await asyncio.sleep(0.8)
        assert len(receives) == busy, "received while the only slot was busy"
        release.set()
        await wait_until(lambda: bool(handler.times("b")), 5, "the second message")
        worker.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    # The second is taken as soon as the slot frees (the requests queue is warm).
    assert handler.times("b")[0] - handler.times("a")[0] < 0.8 + 0.5
