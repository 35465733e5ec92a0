"""The worker loop: receive, lease, decode, dispatch, apply one outcome, repeat.

One request travels in a straight line: transport -> decode -> registry -> handler -> store ->
outcome -> transport. The outcome is decided by the pure ``decide`` and applied in
``_apply`` only; a message is deleted only after its handler made the effect durable and its
follow-up messages were sent (at-least-once: the handlers are idempotent).
"""

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from schemas import Message, decode_body, encode_body, parse_message
from schemas.names import poison_queue_name
from worker.config.redact import Redactor
from worker.config.settings import Settings
from worker.deadletters.envelope import envelope_body, request_id_of
from worker.deadletters.identity import identity_of
from worker.loop.errors import DEAD_LETTER_TYPES, TransientError, describe
from worker.loop.handling import HandlerRegistry, HandlerResult, MessageContext, QueueRole, Send
from worker.loop.outage import StorageGate, is_storage_failure
from worker.loop.outcome import (
    Complete,
    DeadLetter,
    Outcome,
    Resend,
    Retry,
    RetryPolicy,
    check_before_running,
    decide,
    gives_up_in_handler,
)
from worker.observability.health import Health
from worker.queues.lease import Lease
from worker.queues.polling import PollSchedule, policies
from worker.queues.transport import (
    MAX_RECEIVE,
    Broker,
    Delivery,
    LeaseLost,
    QueueNotFound,
    QueueTransport,
)

if TYPE_CHECKING:
    from worker.observability.metrics import Metrics
    from worker.observability.tracing import MessageTracing

# Seconds given to releasing abandoned messages at shutdown.
RELEASE_TIMEOUT = 5.0
# Seconds a receive still in flight at shutdown may take before it is cancelled.
RECEIVE_GRACE = 1.0
# Seconds a message that hit a storage outage waits in-process for storage to come back
# before it is released (then it counts one more attempt).
PARK_LIMIT = 600.0


def _not_observed(*_args: Any) -> None:
    """Metrics off: message outcomes are only logged."""


class Worker:
    """Consumes the requests and runs queues until stopped (or, in burst mode, until idle)."""

    def __init__(
        self,
        broker: Broker,
        registry: HandlerRegistry,
        settings: Settings,
        *,
        redactor: Redactor | None = None,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        gate: StorageGate | None = None,
        metrics: "Metrics | None" = None,
        health: Health | None = None,
        tracing: "MessageTracing | None" = None,
    ) -> None:
        self.broker = broker
        self.registry = registry
        self.settings = settings
        self.redact = redactor or Redactor(settings.secrets())
        # Steps due at once are taken here, without a queue hop (SPEC §5).
        self.in_process_steps = settings.in_process_steps
        self.policy = RetryPolicy(
            max_dequeue_count=settings.max_dequeue_count,
            base_delay=settings.retry_delay,
            max_delay=settings.retry_max_delay,
            create_grace=settings.create_grace,
        )
        # A run's watchdog is never dead-lettered (SPEC §5): once its attempts ran out, a
        # fresh copy is sent, so that no failure lasting longer than five attempts leaves a
        # run active for ever.
        self._policies: dict[QueueRole, RetryPolicy] = {
            "requests": self.policy,
            "runs": self.policy,
            "deadlines": replace(self.policy, resend_exhausted=True),
        }
        # Pauses receiving while the worker's own storage is out (None: never pauses).
        self.gate = gate
        self.stats: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self._now = now
        self._log = structlog.get_logger("worker")
        # Runs first: their steps continue work already accepted, and a backlog of new
        # requests must not starve them into expiry.
        self._queues: list[tuple[QueueTransport, QueueRole]] = [
            (broker.queue(settings.runs_queue), "runs"),
            (broker.queue(settings.deadlines_queue), "deadlines"),
            (broker.queue(settings.requests_queue), "requests"),
        ]
        # When each queue is polled (worker.queues.polling): often for a while after activity, then
        # backing off per queue, and woken when a message the worker delayed falls due.
        self._polls = PollSchedule(
            policies(
                runs=settings.runs_queue,
                deadlines=settings.deadlines_queue,
                requests=settings.requests_queue,
                max_polling_interval=settings.max_polling_interval,
            ),
            time.monotonic(),
            self._rng,
        )
        self._inflight: dict[asyncio.Task[None], Lease] = {}
        # Probes and metrics (worker.observability); metrics None: nothing is reported.
        self.health = health or Health()
        self._observe = metrics.observe_message if metrics is not None else _not_observed
        self._observe_step = metrics.observe_step if metrics is not None else _not_observed
        # One span per message (worker.observability.tracing); None: no spans.
        self._tracing = tracing
        if tracing is not None:
            self._observe = tracing.observing(self._observe)
        if metrics is not None:
            metrics.track_in_flight(lambda: len(self._inflight))
            metrics.expect_dead_letters(settings.work_queues, DEAD_LETTER_TYPES)
        self._stopping = asyncio.Event()
        self._activity = asyncio.Event()
        # The grace period counts from stop(), not from when the loop noticed it.
        self._stop_deadline: float | None = None

    def stop(self) -> None:
        """Stop receiving; in-flight messages get ``shutdown_grace`` seconds to finish."""
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace
        self.health.mark_draining()
        self._stopping.set()
        self._activity.set()

    async def run(self) -> None:
        """Serve until ``stop()`` is called (SIGTERM/SIGINT in the CLI)."""
        await self._serve(burst=False)

    async def run_until_idle(self) -> None:
        """Burst mode: serve until every work queue is empty and nothing is in flight."""
        await self._serve(burst=True)

    async def _serve(self, *, burst: bool) -> None:
        names = [queue.name for queue, _ in self._queues]
        if not await self._ensure_queues([*names, *(poison_queue_name(n) for n in names)]):
            return  # stopped before the queue service answered
        self.health.queues_present = True
        if self.gate is not None:
            # A worker (re)started during an outage must not lease messages only to park them:
            # each lease it took and then lost (a kill) would cost them an attempt.
            await self.gate.check()
        self._log.info(
            "worker.started", queues=names, burst=burst, concurrency=self.settings.concurrency
        )
        try:
            while not self._stopping.is_set():
                if self.gate is not None and not self.gate.is_open:
                    # Storage is out: receiving would only lease messages that cannot run.
                    await self.gate.wait_open(self.settings.max_polling_interval, self._stopping)
                    continue
                received = await self._receive_round()
                if burst and not received and not self._inflight and await self._queues_empty():
                    break
                await self._pause()
        finally:
            await self._drain()
            self.health.mark_stopped()
            self._log.info("worker.stopped", **dict(self.stats))

    async def _ensure_queues(self, names: list[str]) -> bool:
        """Create the work and poison queues that are missing. While the queue service does not
        answer (a worker started during an outage) wait for it, not ready, instead of exiting:
        True once they exist, False if stopped first."""
        while not self._stopping.is_set():
            try:
                await self.broker.ensure_queues(names)
                return True
            except Exception as error:
                if self.gate is None or not self._storage_failure(error):
                    raise
                self._log.warning(
                    "queue.ensure_failed", queues=names, error=self.redact(describe(error))
                )
                await self.gate.confirm_outage(error)
                await self.gate.wait_open(self.settings.max_polling_interval, self._stopping)
        return False

    async def _receive_round(self) -> int:
        """Receive one batch from each queue whose poll is due, bounded by the free slots;
        returns the count."""
        received = 0
        for queue, role in self._queues:
            free = self.settings.concurrency - len(self._inflight)
            if free <= 0 or self._stopping.is_set():
                break
            sent_at = time.monotonic()
            if not self._polls.is_due(queue.name, sent_at):
                continue
            asked = min(free, MAX_RECEIVE)
            try:
                deliveries = await self._unless_stopped(
                    queue, queue.receive(asked, self.settings.visibility_timeout)
                )
            except Exception as error:
                self._polls.polled(queue.name, sent_at, 0, asked)
                self._log.warning(
                    "queue.receive_failed", queue=queue.name, error=self.redact(describe(error))
                )
                if self.gate is not None and self._storage_failure(error):
                    await self.gate.confirm_outage(error)
                continue
            self._polls.polled(queue.name, sent_at, len(deliveries), asked)
            for delivery in deliveries:
                lease = Lease(queue, delivery, self.settings.visibility_timeout)
                context, end_span = self._tracing.start(delivery) if self._tracing else (None, None)
                task = asyncio.create_task(self._process(role, lease), context=context)
                self._inflight[task] = lease
                task.add_done_callback(self._finished)
                if end_span is not None:
                    task.add_done_callback(end_span)
            received += len(deliveries)
        return received

    async def _unless_stopped(
        self, queue: QueueTransport, receiving: Awaitable[list[Delivery]]
    ) -> list[Delivery]:
        """The receive's result, or nothing if ``stop()`` comes first.

        A receive can hang on a slow or unreachable queue service, and SIGTERM must not wait
        for it. Messages that a receive leased after the stop are released at once for the
        next worker; if it does not answer in time it is cancelled, and whatever it may have
        leased reappears when the lease expires.
        """
        receive = asyncio.ensure_future(receiving)
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not receive.done():
            await asyncio.wait({receive}, timeout=RECEIVE_GRACE)
        if not receive.done():
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receive
            return []
        deliveries = receive.result()
        if not self._stopping.is_set():
            return deliveries
        releases = [asyncio.ensure_future(queue.release(d, 0)) for d in deliveries]
        if releases:
            _, unfinished = await asyncio.wait(releases, timeout=RELEASE_TIMEOUT)
            for release in unfinished:
                release.cancel()
            await asyncio.gather(*releases, return_exceptions=True)
        return []

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._polls.finished(time.monotonic())
        self._activity.set()

    async def _pause(self) -> None:
        """Sleep until the next poll is due, waking early when a message finishes, when a
        wake-up is scheduled, or on stop.

        With every slot busy nothing is due: a message finishing frees one.
        """
        self._activity.clear()
        if self._stopping.is_set():
            return
        free = self.settings.concurrency - len(self._inflight)
        delay = self._polls.sleep(time.monotonic(), free)
        if delay is not None and delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._activity.wait(), timeout=delay)

    async def _queues_empty(self) -> bool:
        """Burst mode's end: no request and no step left, visible or delayed. Deadline
        watchdogs do not count: one waits for every run started, long after it ended."""
        queues = [q for q, _ in self._queues if q.name != self.settings.deadlines_queue]
        try:
            counts = await asyncio.gather(*(queue.approximate_count() for queue in queues))
        except Exception:
            return False
        return all(count == 0 for count in counts)

    async def _drain(self) -> None:
        """Give in-flight messages the grace period, then abandon the rest so they reappear."""
        if not self._inflight:
            return
        tasks = list(self._inflight)
        leases = dict(self._inflight)
        self._log.info(
            "worker.draining", in_flight=len(tasks), grace_seconds=self.settings.shutdown_grace
        )
        deadline = self._stop_deadline or time.monotonic() + self.settings.shutdown_grace
        _done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0))
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        abandoned = [leases[task] for task in pending]
        # Visible again at once, so the next worker need not wait for the lease to expire.
        # Bounded: a release that does not finish in time is given up (the message then
        # reappears when its lease expires) and shutdown goes on.
        releases = [asyncio.ensure_future(lease.release(0)) for lease in abandoned]
        _released, unfinished = await asyncio.wait(releases, timeout=RELEASE_TIMEOUT)
        for release in unfinished:
            release.cancel()
        await asyncio.gather(*releases, return_exceptions=True)
        for lease, release in zip(abandoned, releases, strict=True):
            self.stats["abandoned"] += 1
            self._observe("abandoned", {"queue": lease.queue.name}, None)
            self._log.warning(
                "message.abandoned",
                message_id=lease.delivery.message_id,
                queue=lease.queue.name,
                released=not release.cancelled() and release.exception() is None,
            )

    async def _process(self, role: QueueRole, lease: Lease) -> None:
        delivery = lease.delivery
        started = time.monotonic()
        fields: dict[str, Any] = {
            "queue": delivery.queue,
            "message_id": delivery.message_id,
            "attempt": delivery.dequeue_count,
        }
        note: str | None = None
        age = self._age(delivery)
        policy = self._policies[role]
        early = check_before_running(delivery.dequeue_count, policy, age)
        outcome: Outcome | None = early
        give_up: str | None = None
        if isinstance(early, DeadLetter) and gives_up_in_handler(
            role, identity_of(delivery.body).type
        ):
            # Not dead-lettered unseen: the handler, told to give up, ends a step's run
            # failed, or finds that a request's chat never came (see gives_up_in_handler).
            give_up, outcome = early.reason, None
        if outcome is None:
            lease.start_renewal()
            try:
                note, error = await self._attempts(role, lease, fields, give_up)
            finally:
                await lease.stop_renewal()
            outcome = decide(error, delivery.dequeue_count, policy, self._rng.random(), age=age)
        await self._apply(outcome, lease, fields, note, started)

    async def _attempts(
        self, role: QueueRole, lease: Lease, fields: dict[str, Any], give_up: str | None = None
    ) -> tuple[str | None, BaseException | None]:
        """Run the handler; while the worker's own storage is out, wait for it and run again.

        A message that failed only because storage did not answer keeps its lease and its
        attempt count: the gate closes (receiving pauses), and when storage answers the
        handler runs again in place, as a redelivery would (its attempt number goes up, so a
        handler that stored its effect and lost its follow-ups sends them again).
        """
        attempt = lease.delivery.dequeue_count
        parked_since: float | None = None
        while True:
            try:
                with structlog.contextvars.bound_contextvars(**fields):
                    result = await self._handle(role, lease.delivery, fields, attempt, give_up)
                fields.update(result.log_fields)
                return result.note, None
            except Exception as failure:
                error: BaseException = failure
            gate = self.gate
            if gate is None or not self._storage_failure(error):
                return None, error
            if not await gate.confirm_outage(error):
                return None, error  # storage answers: this one request failed, retry as usual
            parked_since = parked_since or time.monotonic()
            waited = time.monotonic() - parked_since
            self._log.warning("message.parked", reason=self.redact(describe(error)), **fields)
            if not await gate.wait_open(max(PARK_LIMIT - waited, 0), self._stopping):
                return None, error
            attempt += 1
            self.stats["resumed_after_outage"] += 1

    def _storage_failure(self, error: BaseException) -> bool:
        """Whether ``error`` says the worker's own storage did not answer (see the gate)."""
        own = self.settings.default_storage_setting
        return is_storage_failure(error, own, self.broker.unavailable)

    def _age(self, delivery: Delivery) -> float | None:
        """Seconds since the message was first enqueued, if the service said when."""
        if delivery.inserted_on is None:
            return None
        return max((self._now() - delivery.inserted_on).total_seconds(), 0.0)

    async def _handle(
        self,
        role: QueueRole,
        delivery: Delivery,
        fields: dict[str, Any],
        attempt: int,
        give_up: str | None = None,
    ) -> HandlerResult:
        message: Message = parse_message(decode_body(delivery.body))
        # A run's steps and watchdog carry the requestId of the post that started it.
        request_id = getattr(message, "request_id", None) or delivery.message_id
        identity = {"type": message.type, "chat_id": message.id, "request_id": request_id}
        run_id = getattr(message, "run_id", None)
        if run_id:
            identity["run_id"] = run_id
        fields.update(identity)
        # Logs of the store, the backends and the tools carry the message's identity too.
        structlog.contextvars.bind_contextvars(**identity)
        handler = self.registry.handler_for(role, message)
        context = MessageContext(
            queue=delivery.queue,
            message_id=delivery.message_id,
            dequeue_count=attempt,
            request_id=request_id,
            give_up=give_up,
            continues_here=self.in_process_steps and not self._stopping.is_set(),
        )
        result = await self._timed(handler(message, context))
        await self._send_effects(result.effects, fields)
        steps = [send for send in result.effects if send.in_process and self.in_process_steps]
        if steps:
            await self._continue_in_process(steps, context, fields)
        return result

    async def _timed(self, handling: Awaitable[HandlerResult]) -> HandlerResult:
        """One handler call (one message, or one step taken in-process), bounded by
        ``WORKER_STEP_TIMEOUT``: a handler that hangs is abandoned and its message retried.
        Model calls and tools have their own, shorter timeouts; this bounds anything else."""
        timeout = self.settings.step_timeout
        try:
            async with asyncio.timeout(timeout):
                return await handling
        except TimeoutError:
            raise TransientError(f"the handler did not finish within {timeout:g} s") from None

    async def _send_effects(self, effects: tuple[Send, ...], fields: dict[str, Any]) -> None:
        """Send a handler's follow-ups, but the steps it left for this process to take.

        Follow-ups go out before the ack: if we die in between, the redelivered message sends
        them again, and their consumers are idempotent."""
        for send in effects:
            if send.in_process and self.in_process_steps:
                continue
            body = encode_body(send.payload, self.settings.message_encoding)
            try:
                # A producer's queue (replyTo) is the producer's to create: one that does not
                # exist (never made, or deleted: a `send --wait` that has ended) is not made
                # again from a name in a message, and its event is dropped.
                await self.broker.send(
                    send.queue, body, delay=send.delay, create_missing=not send.best_effort
                )
            except Exception as error:
                status = getattr(error, "status_code", None)
                refused = isinstance(error, QueueNotFound) or (
                    isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)
                )
                # A queue that refuses the message will always refuse it; anything else may
                # pass on a retry (whose redelivery sends the follow-ups again).
                if not (send.best_effort and refused):
                    raise
                self._log.warning("reply.dropped", reply_queue=send.queue,
                                  error=self.redact(describe(error)), **fields)  # fmt: skip
                continue
            if send.delay > 0:
                self._scheduled(send.queue, send.delay)

    async def _continue_in_process(
        self, steps: list[Send], carrier: MessageContext, fields: dict[str, Any]
    ) -> None:
        """Take the run steps a handler left due now, here, one after the other, instead of
        sending each through the runs queue (SPEC §5). The handled message stays leased
        meanwhile and is the run's carrier: each step's commit records its id, so if this
        worker dies between two steps, the message's redelivery continues the run from the
        last stored step (see ``handlers.step``).

        A step that fails here fails the carrier: the step may have stored its transition
        before it failed, and only a redelivery of the carrier sends again what such a commit
        had to send (a fresh step message would find the run moved on and send nothing). The
        steps inherit the carrier's attempt number, so on the carrier's last attempt a failing
        step ends its run ``failed`` instead. Once the worker is stopping, no new step is
        taken here: the rest goes to the runs queue (``_hand_off``)."""
        pending = list(steps)
        while pending:
            send = pending.pop(0)
            step: Message = parse_message(send.payload)
            if self._stopping.is_set():
                await self._hand_off(send, step, carrier, fields)
                continue
            context = MessageContext(
                queue=send.queue,
                message_id=carrier.message_id,
                dequeue_count=carrier.dequeue_count,
                request_id=carrier.request_id,
                give_up=carrier.give_up,
                in_process=True,
                continues_here=not self._stopping.is_set(),
            )
            started = time.monotonic()
            step_fields = {
                "step": getattr(step, "step", None),
                "run_id": getattr(step, "run_id", None),
                "in_process": True,
            }
            span = (
                self._tracing.in_process_step(send.payload, send.queue, carrier.message_id)
                if self._tracing is not None
                else contextlib.nullcontext(_not_observed)
            )
            try:
                with (
                    span as completed,
                    structlog.contextvars.bound_contextvars(type=step.type, **step_fields),
                ):
                    handler = self.registry.handler_for("runs", step)
                    result = await self._timed(handler(step, context))
                    completed({**fields, "type": step.type, **result.log_fields})
            except Exception:
                self._observe_step("failed", {})
                # The carrier's retry line names the run whose step failed.
                fields.setdefault("run_id", step_fields["run_id"])
                raise
            self.stats["steps_in_process"] += 1
            self._observe_step("completed", result.log_fields)
            self._log.info(
                "step.completed",
                outcome=result.note,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                **{**fields, "type": step.type, **step_fields, **result.log_fields},
            )
            await self._send_effects(result.effects, fields)
            pending.extend(send for send in result.effects if send.in_process)

    async def _hand_off(
        self, send: Send, step: Message, carrier: MessageContext, fields: dict[str, Any]
    ) -> None:
        """The worker is stopping: the step goes to the runs queue for another worker. Its
        handler first gives back what this process holds for it (the claims on tool calls
        written with the turn), so that the worker taking it runs those calls, once, instead
        of waiting for the claims to expire and answering them "interrupted"."""
        context = MessageContext(
            queue=send.queue,
            message_id=carrier.message_id,
            dequeue_count=carrier.dequeue_count,
            request_id=carrier.request_id,
            in_process=True,
            handing_off=True,
        )
        try:
            await self._timed(self.registry.handler_for("runs", step)(step, context))
        except Exception as error:
            # Not fatal: the claims then expire on their own (15 s).
            self._log.warning("step.hand_off_failed", error=self.redact(describe(error)), **fields)
        body = encode_body(send.payload, self.settings.message_encoding)
        await self.broker.send(send.queue, body)
        self._scheduled(send.queue, 0.0)
        self._observe_step("handed_off", {})
        self._log.info(
            "step.handed_off",
            reason="the worker is stopping",
            **{
                **fields,
                "type": step.type,
                "step": getattr(step, "step", None),
                "run_id": getattr(step, "run_id", None),
            },
        )

    def expect(self, queue_name: str, delay: float = 0.0) -> None:
        """Something else in this process put a message on ``queue_name`` (the webhook route
        sends the step a webhook continues): poll for it when it becomes visible."""
        self._scheduled(queue_name, delay)

    def _scheduled(self, queue_name: str, delay: float) -> None:
        """A message this worker sent to ``queue_name`` becomes visible in ``delay`` s (the
        poll schedule wakes for it)."""
        due = time.monotonic() + self.broker.visible_after(delay)
        self._polls.wake_at(queue_name, due)
        self._activity.set()  # the loop may be sleeping past it

    async def _apply(
        self,
        outcome: Outcome,
        lease: Lease,
        fields: dict[str, Any],
        note: str | None,
        started: float,
    ) -> None:
        """The one place where a message is deleted, released or dead-lettered."""
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        try:
            match outcome:
                case Complete():
                    await lease.complete()
                    self.stats["completed"] += 1
                    self._observe("completed", fields, started)
                    self._log.info(
                        "message.completed", outcome=note, duration_ms=duration_ms, **fields
                    )
                case Retry(delay=delay, reason=reason):
                    await lease.release(delay)
                    self._scheduled(lease.queue.name, delay)
                    self.stats["retried"] += 1
                    self._observe("retried", fields, started)
                    self._log.warning(
                        "message.retried",
                        delay_seconds=round(delay, 3),
                        reason=self.redact(reason),
                        duration_ms=duration_ms,
                        **fields,
                    )
                case Resend(delay=delay, reason=reason):
                    # Put first, delete after: a crash in between leaves two, never none.
                    await self.broker.send(lease.queue.name, lease.delivery.body, delay=delay)
                    await lease.complete()
                    self._scheduled(lease.queue.name, delay)
                    self.stats["resent"] += 1
                    self._observe("resent", fields, started)
                    self._log.warning(
                        "message.resent",
                        delay_seconds=round(delay, 3),
                        reason=self.redact(reason),
                        duration_ms=duration_ms,
                        **fields,
                    )
                case DeadLetter(reason=reason, error_type=error_type):
                    await self._dead_letter(lease, self.redact(reason), error_type, fields)
                    self.stats["dead_lettered"] += 1
                    self._observe("dead_lettered", fields, started, error_type)
                    # A message never decoded or never run still says what it was (read
                    # best-effort from its body, as `poison list` does).
                    said = identity_of(lease.delivery.body).log_fields()
                    self._log.error(
                        "message.dead_lettered",
                        reason=self.redact(reason),
                        error_type=error_type,
                        duration_ms=duration_ms,
                        **{**said, **fields},
                    )
        except LeaseLost:
            # Someone else holds the message now; it will be processed again, harmlessly.
            self.stats["lease_lost"] += 1
            self._observe("lease_lost", fields, started)
            self._log.warning("message.lease_lost", duration_ms=duration_ms, **fields)
        except Exception as error:
            # The message stays on its queue and reappears when its lease expires.
            self.stats["ack_failed"] += 1
            self._observe("ack_failed", fields, started)
            self._log.error(
                "message.ack_failed",
                error=self.redact(describe(error)),
                duration_ms=duration_ms,
                **fields,
            )

    async def _dead_letter(
        self, lease: Lease, reason: str, error_type: str, fields: dict[str, Any]
    ) -> None:
        delivery = lease.delivery
        body = envelope_body(
            delivery,
            reason=reason,
            error_type=error_type,
            request_id=fields.get("request_id") or request_id_of(delivery.body),
            now=self._now(),
            encoding=self.settings.message_encoding,
            # A producer may have pasted one of the worker's own secrets (a connection string
            # in place of a setting name): it must not be copied to the poison queue.
            mask=self.redact.mask_known,
        )
        # Put first, delete after: a crash in between leaves a duplicate, never a loss.
        await self.broker.send(poison_queue_name(delivery.queue), body, time_to_live=-1)
        await lease.complete()
