"""When to poll each work queue: a pure schedule, with no I/O and no clock of its own.

The loop asks ``PollSchedule`` which queues are due and how long it may sleep, and tells it
what happened: a receive and how many messages it returned, a message finishing (activity),
and a message the worker itself put on a work queue (or released) with a delay (a wake-up at
the time it becomes visible). Times are ``time.monotonic()`` seconds, given by the caller.

Each queue has its own state:

- **backoff**: an empty receive doubles the interval (from 0.1 s, randomized ±10 %) up to the
  queue's cap. Caps (``policies``): requests ``WORKER_MAX_POLLING_INTERVAL``, runs twice it
  (the worker's own steps wake it, below), deadlines six times it but at most 60 s (a run may
  end ``expired`` up to a minute late).
- **warm**: within ``WARM_WINDOW`` (35) seconds of the worker's last activity (a message
  received or finished) a warm queue is polled every warm interval instead: the requests
  queue every 0.2 s (a post that follows a reply is picked up at once), the runs queue every
  second (its messages are mostly the worker's own, which wake it). After the window the
  backoff climbs again from the warm interval.
- **backlog**: a receive that filled its page is followed by another at once.
- **wake-ups**: a message the worker sent with a delay, or released for a retry, is polled
  for at the moment it becomes visible, whatever the backoff says; if that poll finds
  nothing, the queue is polled once more ``RECHECK`` seconds later (another replica may have
  taken it, or the service's clock runs a little behind).
- **finish**: a message finishing makes the runs queue due at once (it may have sent a
  step visible at once).
- **busy**: with no free slot nothing is due; a message finishing frees one.
"""

import heapq
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

# Seconds after the worker's last activity during which warm queues are polled often: a
# post that follows within 30 s is picked up at once (with a margin for the producer's side).
WARM_WINDOW = 35.0
# Warm intervals: a post is picked up within about 0.1 s on average.
REQUESTS_WARM = 0.2
RUNS_WARM = 1.0
# The deadlines queue's cap: never more than this (due deadlines may wait up to a minute).
DEADLINES_MAX_CAP = 60.0
# Seconds after a wake-up that found nothing until the queue is polled once more.
RECHECK = 0.25


@dataclass
class IdleBackoff:
    """Randomized exponential backoff for polling an empty queue (as the Functions trigger).

    Starts at ``minimum`` (100 ms), doubles on every empty receive up to ``maximum``, and
    starts over on a message (``reset``); ``resume_from`` makes it climb from a given step
    (the warm interval). Each delay is the step ±``jitter`` (a fraction), so that replicas do
    not poll in lockstep while the mean interval stays the step.
    """

    maximum: float
    minimum: float = 0.1
    current: float = 0.0
    jitter: float = 0.1

    def next_delay(self, rng: random.Random) -> float:
        if self.current == 0:
            self.current = min(self.minimum, self.maximum)
        else:
            self.current = min(self.current * 2, self.maximum)
        return self.current * (1 + self.jitter * (2 * rng.random() - 1))

    def reset(self) -> None:
        self.current = 0.0

    def resume_from(self, step: float) -> None:
        self.current = min(step, self.maximum)


@dataclass(frozen=True)
class QueuePolicy:
    """How one queue is polled."""

    name: str
    cap: float
    # Seconds between polls within the warm window (None: the queue is never warm).
    warm: float | None = None
    # Whether the worker's own delayed messages to this queue wake it.
    wakes: bool = True
    # Whether a message finishing makes it due at once (it may have sent one here).
    after_finish: bool = False


def policies(
    *, runs: str, deadlines: str, requests: str, max_polling_interval: float
) -> list[QueuePolicy]:
    """The three work queues' policies, in the order they are polled (runs first)."""
    cap = max_polling_interval
    return [
        QueuePolicy(runs, 2 * cap, warm=min(RUNS_WARM, cap), after_finish=True),
        QueuePolicy(deadlines, min(6 * cap, max(DEADLINES_MAX_CAP, cap)), wakes=False),
        QueuePolicy(requests, cap, warm=min(REQUESTS_WARM, cap)),
    ]


@dataclass
class _Queue:
    policy: QueuePolicy
    backoff: IdleBackoff
    next_at: float
    # (due, is a recheck) of the wake-ups not yet met by a poll, earliest first.
    wakes: list[tuple[float, bool]] = field(default_factory=list)

    def due_at(self) -> float:
        return min(self.next_at, self.wakes[0][0]) if self.wakes else self.next_at


class PollSchedule:
    """The poll times of a worker's queues (see the module's docstring)."""

    def __init__(
        self,
        queues: Iterable[QueuePolicy],
        now: float,
        rng: random.Random | None = None,
        *,
        warm_window: float = WARM_WINDOW,
    ) -> None:
        self._queues = {q.name: _Queue(q, IdleBackoff(maximum=q.cap), next_at=now) for q in queues}
        self._rng = rng or random.Random()
        self._warm_window = warm_window
        self._last_activity = -math.inf

    @property
    def names(self) -> list[str]:
        return list(self._queues)

    def is_warm(self, now: float) -> bool:
        return now < self._last_activity + self._warm_window

    def due(self, now: float, free: int) -> list[str]:
        """The queues to poll now, in polling order (none without a free slot)."""
        if free <= 0:
            return []
        return [name for name, q in self._queues.items() if q.due_at() <= now]

    def is_due(self, name: str, now: float) -> bool:
        return self._queues[name].due_at() <= now

    def sleep(self, now: float, free: int) -> float | None:
        """Seconds until the next poll is due (0: now); None: none until a slot frees."""
        if free <= 0:
            return None
        return max(min(q.due_at() for q in self._queues.values()) - now, 0.0)

    def polled(self, name: str, at: float, received: int, asked: int) -> None:
        """A receive of up to ``asked`` messages was sent at ``at`` and returned ``received``
        (a failed receive counts as empty)."""
        queue = self._queues[name]
        missed = False
        while queue.wakes and queue.wakes[0][0] <= at:
            _due, recheck = heapq.heappop(queue.wakes)
            missed = missed or not recheck
        if received > 0:
            self.activity(at)
            queue.backoff.reset()
            if received >= asked:
                queue.next_at = at  # a backlog: take the next page at once
                return
        elif missed:
            heapq.heappush(queue.wakes, (at + RECHECK, True))
        queue.next_at = at + self._interval(queue, at)

    def activity(self, now: float) -> None:
        """A message was received or finished: warm queues are polled often again."""
        self._last_activity = max(self._last_activity, now)
        for queue in self._queues.values():
            if queue.policy.warm is not None:
                queue.next_at = min(queue.next_at, now + queue.policy.warm)

    def finished(self, now: float) -> None:
        """A message finished: activity, and the queues it may have sent to are due now."""
        self.activity(now)
        for queue in self._queues.values():
            if queue.policy.after_finish:
                queue.next_at = min(queue.next_at, now)

    def wake_at(self, name: str, due: float) -> None:
        """Poll ``name`` at ``due``, when a message the worker put there becomes visible."""
        queue = self._queues.get(name)
        if queue is not None and queue.policy.wakes:
            heapq.heappush(queue.wakes, (due, False))

    def _interval(self, queue: _Queue, now: float) -> float:
        warm = queue.policy.warm
        if warm is not None and self.is_warm(now):
            queue.backoff.resume_from(warm)
            return warm * (1 + queue.backoff.jitter * (2 * self._rng.random() - 1))
        return queue.backoff.next_delay(self._rng)
