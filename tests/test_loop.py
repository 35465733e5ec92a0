"""The worker loop on the in-memory broker: outcomes, leases, effects, shutdown.

Fast tests of the loop's logic with fake handlers; the same loop is tested end to end on
Azurite in the other test files.
"""

import asyncio
import json
import random
from datetime import timedelta
from typing import Any

import structlog

from schemas import AssistantCreate, decode_body
from tests.support.env import wait_until
from worker.config.settings import Settings
from worker.loop.errors import PermanentError, TransientError
from worker.loop.handling import HandlerRegistry, HandlerResult, MessageContext, Send
from worker.loop.worker import Worker
from worker.queues.memory import MemoryBroker

SETTINGS = Settings.from_env(
    {
        "WORKER_MAX_POLLING_INTERVAL": "0.05",
        "WORKER_RETRY_DELAY": "0",
        "WORKER_RETRY_MAX_DELAY": "0",
        "WORKER_CONCURRENCY": "4",
        "OPENAI_API_KEY": "sk-test-secret-value",
    }
)
REQUESTS = SETTINGS.requests_queue
POISON = f"{REQUESTS}-poison"


class Recorder:
    """A handler that records its calls and does what the test says per chat id."""

    def __init__(self, behaviour: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, MessageContext]] = []
        self.behaviour = behaviour or {}

    async def __call__(self, message: AssistantCreate, context: MessageContext) -> HandlerResult:
        self.calls.append((message.id, context))
        action = self.behaviour.get(message.id)
        if isinstance(action, BaseException):
            raise action
        if callable(action):
            result = await action(message, context)
            assert isinstance(result, HandlerResult)
            return result
        return HandlerResult(note="created")


def make_worker(handler: Any, broker: MemoryBroker, settings: Settings = SETTINGS) -> Worker:
    registry = HandlerRegistry(requests={"assistantCreate": handler}, runs={})
    return Worker(broker, registry, settings, rng=random.Random(1))


def send(broker: MemoryBroker, body: dict[str, Any] | str, queue: str = REQUESTS) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return broker.queue(queue).put(text)


def poison(broker: MemoryBroker) -> list[dict[str, Any]]:
    return [decode_body(body) for body in broker.queue(POISON).bodies()]


def test_valid_messages_are_handled_and_deleted() -> None:
    """Each message reaches its handler once, with the request id, and is deleted."""
    broker, handler = MemoryBroker(), Recorder()
    send(broker, {"id": "a", "requestId": "r-1"})
    message_id = send(broker, {"id": "b"})
    worker = make_worker(handler, broker)
    with structlog.testing.capture_logs() as logs:
        asyncio.run(worker.run_until_idle())
    assert sorted(chat for chat, _ in handler.calls) == ["a", "b"]
    contexts = {chat: context for chat, context in handler.calls}
    assert contexts["a"].request_id == "r-1"
    assert contexts["b"].request_id == message_id
    assert broker.queue(REQUESTS).messages == {}
    completed = [e for e in logs if e["event"] == "message.completed"]
    assert {e["chat_id"] for e in completed} == {"a", "b"}
    assert all(e["outcome"] == "created" and e["type"] == "assistantCreate" for e in completed)


def test_bad_input_is_dead_lettered_at_once_and_others_go_on() -> None:
    """Malformed bodies go to the poison queue on their first attempt with a reason."""
    broker, handler = MemoryBroker(), Recorder()
    send(broker, "not json")
    send(broker, {"id": "ok"})
    send(broker, {"type": "nope", "id": "x"})
    asyncio.run(make_worker(handler, broker).run_until_idle())
    letters = poison(broker)
    reasons = sorted(letter["deadLetter"]["reason"] for letter in letters)
    assert len(reasons) == 2
    assert "neither JSON nor Base64" in reasons[0]
    assert "unknown message type 'nope'" in reasons[1]
    assert all(letter["deadLetter"]["dequeueCount"] == 1 for letter in letters)
    assert {
        letter["message"] if isinstance(letter["message"], str) else "json" for letter in letters
    } == {"not json", "json"}
    assert [chat for chat, _ in handler.calls] == ["ok"]


def test_permanent_handler_errors_are_dead_lettered_with_their_reason() -> None:
    """A handler's PermanentError is not retried."""
    broker = MemoryBroker()
    handler = Recorder(
        {"gone": PermanentError("assistant 'gone' does not exist", error_type="UnknownAssistant")}
    )
    send(broker, {"id": "gone", "requestId": "r-7"})
    asyncio.run(make_worker(handler, broker).run_until_idle())
    [letter] = poison(broker)
    assert letter["deadLetter"]["reason"] == "assistant 'gone' does not exist"
    assert letter["deadLetter"]["errorType"] == "UnknownAssistant"
    assert letter["deadLetter"]["requestId"] == "r-7"
    assert letter["message"] == {"id": "gone", "requestId": "r-7"}
    assert len(handler.calls) == 1


def test_transient_errors_are_retried_then_dead_lettered() -> None:
    """A failing handler runs max_dequeue_count times, then the message is dead-lettered."""
    broker = MemoryBroker()
    handler = Recorder({"flaky": TransientError("table service unavailable")})
    send(broker, {"id": "flaky"})
    with structlog.testing.capture_logs() as logs:
        asyncio.run(make_worker(handler, broker).run_until_idle())
    assert len(handler.calls) == SETTINGS.max_dequeue_count
    assert [c.dequeue_count for _, c in handler.calls] == [1, 2, 3, 4, 5]
    [letter] = poison(broker)
    assert "gave up after 5 attempts" in letter["deadLetter"]["reason"]
    assert "table service unavailable" in letter["deadLetter"]["reason"]
    assert sum(e["event"] == "message.retried" for e in logs) == 4


def test_retry_delay_comes_from_the_policy() -> None:
    """A retried message is invisible for the backoff delay."""
    broker = MemoryBroker()
    settings = SETTINGS.with_values(retry_delay=30.0, retry_max_delay=60.0)
    handler = Recorder({"slow": TransientError("busy")})
    send(broker, {"id": "slow"})
    worker = make_worker(handler, broker, settings)

    async def one_round() -> None:
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: worker.stats["retried"] > 0, 5, "a retry")
        worker.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(one_round())
    [message] = broker.queue(REQUESTS).messages.values()
    assert 29 < message.visible_at - broker.clock() <= 36


def test_too_many_deliveries_are_dead_lettered_without_running() -> None:
    """A message delivered more than max_dequeue_count times is not run again."""
    broker, handler = MemoryBroker(), Recorder()
    send(broker, {"id": "crashy"})
    stored = next(iter(broker.queue(REQUESTS).messages.values()))
    stored.dequeue_count = SETTINGS.max_dequeue_count
    # Older than the create grace (within it, a request may have waited for its chat).
    stored.inserted_on -= timedelta(seconds=SETTINGS.create_grace + 1)
    asyncio.run(make_worker(handler, broker).run_until_idle())
    assert handler.calls == []
    [letter] = poison(broker)
    assert letter["deadLetter"]["errorType"] == "MaxDequeueCountExceeded"


def test_a_request_waiting_for_its_chat_runs_however_often_it_was_delivered() -> None:
    """Within the create grace a post may have been delivered many times while it waited
    for its create (short delays): it is still run, not dead-lettered for its count."""
    broker, handler = MemoryBroker(), Recorder()
    send(broker, {"id": "waited"})
    stored = next(iter(broker.queue(REQUESTS).messages.values()))
    stored.dequeue_count = SETTINGS.max_dequeue_count * 4
    asyncio.run(make_worker(handler, broker).run_until_idle())
    assert [chat for chat, _ in handler.calls] == ["waited"]
    assert poison(broker) == []


def test_effects_are_sent_before_the_message_is_deleted() -> None:
    """Follow-up messages go out first: the ack comes after every effect is sent."""
    broker = MemoryBroker()
    seen_at_send: list[int] = []

    async def with_effect(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        return HandlerResult(note="ok", effects=(Send("replies", {"type": "x", "id": message.id}),))

    original_send = broker.send

    async def spying_send(queue: str, body: str, **kwargs: Any) -> str:
        seen_at_send.append(len(broker.queue(REQUESTS).messages))
        return await original_send(queue, body, **kwargs)

    broker.send = spying_send  # type: ignore[method-assign]
    send(broker, {"id": "e"})
    asyncio.run(make_worker(Recorder({"e": with_effect}), broker).run_until_idle())
    assert seen_at_send == [1]
    assert [decode_body(b) for b in broker.queue("replies").bodies()] == [{"type": "x", "id": "e"}]
    assert broker.queue(REQUESTS).messages == {}


def test_a_failed_effect_retries_the_message() -> None:
    """If a follow-up cannot be sent, the message is retried, not deleted."""
    broker = MemoryBroker()

    async def with_effect(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        return HandlerResult(note="ok", effects=(Send("replies", {"id": message.id}),))

    async def failing_send(queue: str, body: str, **kwargs: Any) -> str:
        raise ConnectionError("queue service unreachable")

    send(broker, {"id": "e"})
    worker = make_worker(
        Recorder({"e": with_effect}), broker, SETTINGS.with_values(max_dequeue_count=2)
    )
    broker.send = failing_send  # type: ignore[method-assign]

    async def until_retried() -> None:
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: worker.stats["retried"] > 0, 5, "a retry")
        worker.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(until_retried())
    assert len(broker.queue(REQUESTS).messages) == 1


def test_lease_is_renewed_while_the_handler_runs() -> None:
    """A handler slower than the visibility timeout keeps its message leased."""
    broker = MemoryBroker()
    settings = SETTINGS.with_values(visibility_timeout=1.0)
    receipts: list[str] = []

    async def slow(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        queue = broker.queue(REQUESTS)
        for _ in range(3):
            await asyncio.sleep(0.6)
            receipts.append(next(iter(queue.messages.values())).pop_receipt)
            # Still leased: nobody else could receive it now.
            assert await queue.receive(1, 1.0) == []
        return HandlerResult(note="done")

    send(broker, {"id": "slow"})
    worker = make_worker(Recorder({"slow": slow}), broker, settings)
    asyncio.run(worker.run_until_idle())
    assert len(set(receipts)) >= 2, "the pop receipt changes when the lease is renewed"
    assert worker.stats["completed"] == 1
    assert broker.queue(REQUESTS).messages == {}


def test_stop_drains_in_flight_work_and_releases_the_rest() -> None:
    """On stop, finished work is deleted and unfinished work is made visible at once."""
    broker = MemoryBroker()
    settings = SETTINGS.with_values(shutdown_grace=0.3, visibility_timeout=60.0)
    started = asyncio.Event()

    async def quick(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        await asyncio.sleep(0.05)
        return HandlerResult(note="done")

    async def stuck(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        started.set()
        await asyncio.sleep(30)
        return HandlerResult(note="never")

    send(broker, {"id": "quick"})
    send(broker, {"id": "stuck"})
    worker = make_worker(Recorder({"quick": quick, "stuck": stuck}), broker, settings)

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 5)
        worker.stop()
        await asyncio.wait_for(task, 5)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    assert worker.stats["completed"] == 1
    assert worker.stats["abandoned"] == 1
    [left] = broker.queue(REQUESTS).messages.values()
    assert json.loads(left.body)["id"] == "stuck"
    assert left.visible_at <= broker.clock(), "released for the next worker at once"
    assert any(e["event"] == "message.abandoned" and e["released"] for e in logs)


def test_concurrency_bounds_messages_in_flight() -> None:
    """No more than WORKER_CONCURRENCY handlers run at once."""
    broker = MemoryBroker()
    running = 0
    peak = 0

    async def counted(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return HandlerResult(note="ok")

    for n in range(20):
        send(broker, {"id": f"c{n}"})
    handler = Recorder({f"c{n}": counted for n in range(20)})
    asyncio.run(make_worker(handler, broker).run_until_idle())
    assert len(handler.calls) == 20
    assert peak == SETTINGS.concurrency


def test_run_steps_belong_on_the_runs_queue() -> None:
    """A message type sent to the wrong queue is dead-lettered with a reason saying so."""
    broker = MemoryBroker()
    registry = HandlerRegistry(
        requests={"assistantCreate": Recorder()}, runs={"runStep": Recorder()}
    )
    send(broker, {"type": "runStep", "id": "c", "runId": "r", "step": 0})
    asyncio.run(Worker(broker, registry, SETTINGS).run_until_idle())
    [letter] = poison(broker)
    assert "belong on the runs queue" in letter["deadLetter"]["reason"]


def test_secrets_never_reach_logs_or_dead_letters() -> None:
    """An error that carries a configured secret is masked in the log and the dead letter."""
    broker = MemoryBroker()
    handler = Recorder({"leak": PermanentError("bad key sk-test-secret-value used")})
    send(broker, {"id": "leak"})
    with structlog.testing.capture_logs() as logs:
        asyncio.run(make_worker(handler, broker).run_until_idle())
    assert "sk-test-secret-value" not in json.dumps(poison(broker))
    assert "sk-test-secret-value" not in json.dumps(logs, default=str)


def test_oversized_and_deeply_nested_bodies_are_still_dead_lettered() -> None:
    """A dead letter always fits a queue message, whatever the original body was."""
    broker = MemoryBroker()
    huge = json.dumps({"type": "nope", "id": "x", "padding": "p" * 70_000})
    deep = '{"type": "nope", "id": "y", "deep": ' + "[" * 300 + "]" * 300 + "}"
    send(broker, huge)
    send(broker, deep)
    asyncio.run(make_worker(Recorder(), broker).run_until_idle())
    letters = poison(broker)
    assert len(letters) == 2
    assert all(len(body.encode()) <= 64 * 1024 for body in broker.queue(POISON).bodies())
    by_reason = {("too large" in letter["deadLetter"]["reason"]): letter for letter in letters}
    truncated = by_reason[True]["message"]
    assert truncated["truncated"] is True
    assert truncated["originalLength"] == len(huge)
    assert huge.startswith(truncated["head"])
    assert by_reason[False]["message"] in (deep, json.loads(deep))
    assert broker.queue(REQUESTS).messages == {}


def test_a_step_delivered_too_often_ends_its_run_instead_of_being_dead_lettered() -> None:
    """A runStep past the dequeue limit reaches its handler once more, told to give up (so
    that it can end the run failed and the chat goes on); it is not dead-lettered."""
    broker, steps = MemoryBroker(), Recorder()
    registry = HandlerRegistry(requests={}, runs={"runStep": steps})
    send(broker, {"type": "runStep", "id": "c", "runId": "r", "step": 2}, SETTINGS.runs_queue)
    stored = next(iter(broker.queue(SETTINGS.runs_queue).messages.values()))
    stored.dequeue_count = SETTINGS.max_dequeue_count
    stored.inserted_on -= timedelta(seconds=SETTINGS.create_grace + 1)
    asyncio.run(Worker(broker, registry, SETTINGS).run_until_idle())
    [(_, context)] = steps.calls
    assert context.give_up is not None and "without finishing" in context.give_up
    assert poison(broker) == []


# --- steps taken in-process ---------------------------------------------------------------------


def step_payload(step: int) -> dict[str, Any]:
    return {"type": "runStep", "id": "c", "runId": "r", "step": step}


def test_steps_due_at_once_are_taken_in_process_with_the_carrier() -> None:
    """A handler's step marked in_process is not sent: the loop runs it at once, in this
    process, with the handled message's id (the run's carrier), and so on down the chain;
    a delayed step and the other effects go to their queues; the carrier is deleted last."""
    broker = MemoryBroker()
    seen: list[tuple[int, MessageContext, bool]] = []

    async def post(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        first = Send(SETTINGS.runs_queue, step_payload(0), in_process=True)
        return HandlerResult(note="run started", effects=(first, Send("replies", {"a": 1})))

    async def step(message: Any, context: MessageContext) -> HandlerResult:
        held = context.message_id in broker.queue(REQUESTS).messages
        seen.append((message.step, context, held))
        if message.step == 3:
            return HandlerResult(note="polled")
        if message.step < 2:
            effect = Send(SETTINGS.runs_queue, step_payload(message.step + 1), in_process=True)
        else:
            effect = Send(SETTINGS.runs_queue, step_payload(3), delay=0.2)  # must wait
        return HandlerResult(note="stepped", effects=(effect,))

    registry = HandlerRegistry(requests={"assistantCreate": post}, runs={"runStep": step})
    carrier = send(broker, {"id": "c"})
    asyncio.run(Worker(broker, registry, SETTINGS).run_until_idle())
    assert [number for number, _, _ in seen] == [0, 1, 2, 3]
    chain, (_, polled, _) = seen[:3], seen[3]
    assert all(c.message_id == carrier and c.in_process and c.continues_here for _, c, _ in chain)
    assert all(held for _, _, held in chain), "the carrier stays leased during the chain"
    assert not polled.in_process and polled.message_id != carrier, "the wait is a message"
    assert broker.queue(REQUESTS).bodies() == [], "the carrier is deleted when the chain ends"
    assert [json.loads(b) for b in broker.queue("replies").bodies()] == [{"a": 1}]


def test_a_step_that_fails_in_process_fails_its_carrier() -> None:
    """An in-process step that fails (it may have stored its transition before it did) fails
    the message that carries the run: that message is retried, delayed like any failure,
    and its redelivery continues the run; no fresh step message is sent."""
    broker = MemoryBroker()
    deliveries: list[MessageContext] = []

    async def post(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        deliveries.append(context)
        return HandlerResult(
            note="run started",
            effects=(Send(SETTINGS.runs_queue, step_payload(0), in_process=True),),
        )

    calls: list[MessageContext] = []

    async def step(message: Any, context: MessageContext) -> HandlerResult:
        calls.append(context)
        if len(calls) == 1:
            raise TransientError("another worker holds a claim", retry_after=0.3)
        return HandlerResult(note="stepped")

    registry = HandlerRegistry(requests={"assistantCreate": post}, runs={"runStep": step})
    carrier = send(broker, {"id": "c"})
    settings = Settings.from_env(
        {"WORKER_MAX_POLLING_INTERVAL": "0.05", "WORKER_RETRY_MAX_DELAY": "10"}
    )
    with structlog.testing.capture_logs() as logs:
        asyncio.run(Worker(broker, registry, settings).run_until_idle())
    assert broker.queue(REQUESTS).bodies() == []
    assert broker.queue(SETTINGS.runs_queue).bodies() == [], "no step message was sent"
    assert [c.dequeue_count for c in deliveries] == [1, 2]
    assert all(c.in_process and c.message_id == carrier for c in calls)
    assert [c.dequeue_count for c in calls] == [1, 2], "a step shares its carrier's attempt"
    [retried] = [e for e in logs if e["event"] == "message.retried"]
    assert "claim" in retried["reason"] and retried["delay_seconds"] == 0.3
    assert retried["run_id"] == "r", "the carrier's retry names the run whose step failed"
    completed = [e for e in logs if e["event"] == "message.completed"]
    assert [e["type"] for e in completed] == ["assistantCreate"]


def test_a_stopping_worker_hands_its_next_step_to_the_queue() -> None:
    """Once the worker is stopping it takes no new step in-process: the step's handler is
    asked to give back what it holds (``handing_off``), and the step goes to the runs queue."""
    broker = MemoryBroker()
    worker: Worker | None = None

    async def post(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        assert worker is not None
        worker.stop()  # SIGTERM arrives while the post is handled
        return HandlerResult(
            note="run started",
            effects=(Send(SETTINGS.runs_queue, step_payload(0), in_process=True),),
        )

    steps = Recorder()
    registry = HandlerRegistry(requests={"assistantCreate": post}, runs={"runStep": steps})
    send(broker, {"id": "c"})
    worker = Worker(broker, registry, SETTINGS)
    with structlog.testing.capture_logs() as logs:
        asyncio.run(worker.run())
    [(_, context)] = steps.calls
    assert context.handing_off and context.in_process
    assert [json.loads(b)["step"] for b in broker.queue(SETTINGS.runs_queue).bodies()] == [0]
    assert broker.queue(REQUESTS).bodies() == [], "the carrier completes"
    assert [e["event"] for e in logs if e["event"].startswith("step.")] == ["step.handed_off"]


def test_in_process_steps_can_be_turned_off() -> None:
    """WORKER_IN_PROCESS_STEPS=false: a step marked in_process is sent like any other and
    comes back as a message of its own."""
    broker = MemoryBroker()
    steps = Recorder()

    async def post(message: AssistantCreate, context: MessageContext) -> HandlerResult:
        assert not context.continues_here
        return HandlerResult(
            note="run started",
            effects=(Send(SETTINGS.runs_queue, step_payload(0), in_process=True),),
        )

    settings = Settings.from_env(
        {"WORKER_IN_PROCESS_STEPS": "false", "WORKER_MAX_POLLING_INTERVAL": "0.05"}
    )
    registry = HandlerRegistry(requests={"assistantCreate": post}, runs={"runStep": steps})
    carrier = send(broker, {"id": "c"})
    asyncio.run(Worker(broker, registry, settings).run_until_idle())
    [(_, context)] = steps.calls
    assert not context.in_process and context.message_id != carrier


def test_a_watchdog_that_keeps_failing_is_sent_again_not_dead_lettered() -> None:
    """A runDeadline whose handler fails on every attempt is never dead-lettered: after its
    last attempt a fresh copy goes to the deadlines queue (and fails again, and so on, until
    the failure passes)."""
    broker = MemoryBroker()
    seen: list[int] = []
    expired: list[asyncio.Event] = []

    async def deadline(message: Any, context: MessageContext) -> HandlerResult:
        seen.append(context.dequeue_count)
        if len(seen) <= SETTINGS.max_dequeue_count + 2:
            raise TransientError("the chat's storage account does not answer")
        expired[0].set()
        return HandlerResult(note="expired at its deadline")

    registry = HandlerRegistry(requests={}, runs={}, deadlines={"runDeadline": deadline})
    body = {"type": "runDeadline", "id": "c", "runId": "r"}
    send(broker, body, SETTINGS.deadlines_queue)
    with structlog.testing.capture_logs() as logs:
        worker = Worker(broker, registry, SETTINGS)

        async def until_done() -> None:
            expired.append(asyncio.Event())
            serving = asyncio.create_task(worker.run())
            await expired[0].wait()
            worker.stop()
            await serving

        asyncio.run(asyncio.wait_for(until_done(), 30))
    assert seen == [1, 2, 3, 4, 5, 1, 2, 3]
    assert broker.queue(f"{SETTINGS.deadlines_queue}-poison").bodies() == []
    [resent] = [e for e in logs if e["event"] == "message.resent"]
    assert "does not answer" in resent["reason"]
