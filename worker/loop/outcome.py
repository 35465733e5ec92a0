"""What to do with a message after its handler ran: a pure decision, applied in one place.

``decide`` never does I/O; the worker loop applies its answer (complete, release with a delay,
send a fresh copy, or dead-letter) and nothing else in the code acks, retries or dead-letters a
message.
"""

from dataclasses import dataclass

from schemas import InvalidMessage
from worker.loop.errors import ChatNotFound, PermanentError, TransientError, describe


@dataclass(frozen=True)
class Complete:
    """The effect is durable: delete the message."""


@dataclass(frozen=True)
class Retry:
    """Make the message visible again after ``delay`` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    """Move the message to the poison queue with a reason a person can act on."""

    reason: str
    error_type: str


@dataclass(frozen=True)
class Resend:
    """Send a fresh copy of the message, visible after ``delay`` seconds, then delete this one.

    For a message that must never be dead-lettered (a run's watchdog: SPEC §5) once its
    attempts ran out: the copy starts again at attempt 1, so the retries go on, at least
    ``delay`` apart, until the failure passes."""

    delay: float
    reason: str


Outcome = Complete | Retry | Resend | DeadLetter


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a message gets and how long to wait between them."""

    max_dequeue_count: int = 5
    base_delay: float = 2.0
    max_delay: float = 300.0
    # Seconds after enqueue that a request for a chat that does not exist yet keeps waiting.
    create_grace: float = 120.0
    # Never dead-letter a message whose attempts ran out (a transient failure, or deliveries
    # that may have crashed the worker): send a fresh copy after ``max_delay`` instead.
    resend_exhausted: bool = False


# Delays between the attempts of a request waiting for its chat to be created: the create is
# usually a moment behind, so seconds, not the transient-failure backoff (the last repeats).
CREATE_WAIT_DELAYS = (1.0, 1.0, 2.0, 2.0, 3.0, 5.0)


def create_wait_delay(attempt: int) -> float:
    """Delay after attempt ``attempt`` (1-based) of a request whose chat does not exist yet."""
    return CREATE_WAIT_DELAYS[min(max(attempt, 1), len(CREATE_WAIT_DELAYS)) - 1]


def backoff(attempt: int, policy: RetryPolicy, *, jitter: float = 0.0) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2^(attempt-1)``, capped, plus jitter.

    ``jitter`` is a fraction in [0, 1) drawn by the caller (pure: no randomness in here), so
    that replicas that failed together do not retry together.
    """
    exponent = max(attempt - 1, 0)
    delay = min(policy.base_delay * float(2**exponent), policy.max_delay)
    return delay * (1 + 0.2 * jitter)


def decide(
    error: BaseException | None,
    dequeue_count: int,
    policy: RetryPolicy,
    jitter: float = 0.0,
    *,
    age: float | None = None,
) -> Outcome:
    """The outcome for a message whose handler ended with ``error`` (None: it succeeded).

    ``age`` is how long ago the message was first enqueued (None when unknown).
    """
    if error is None:
        return Complete()
    # Every reason goes through ``describe``: bounded, whatever the request made it say.
    reason = describe(error)
    if isinstance(error, ChatNotFound):
        if age is not None and age < policy.create_grace:
            remaining = policy.create_grace - age
            return Retry(min(create_wait_delay(dequeue_count), remaining + 1.0), reason)
        waited = f" (it waited {age:.0f} s for its create)" if age is not None else ""
        return DeadLetter(f"{reason}{waited}", error.error_type)
    if isinstance(error, PermanentError):
        return DeadLetter(reason, error.error_type)
    if isinstance(error, InvalidMessage):
        return DeadLetter(reason, "InvalidMessage")
    if dequeue_count >= policy.max_dequeue_count and policy.resend_exhausted:
        return Resend(policy.max_delay, f"failed {dequeue_count} attempts; last error: {reason}")
    if dequeue_count >= policy.max_dequeue_count:
        error_type = getattr(error, "error_type", None) or type(error).__name__
        return DeadLetter(
            f"gave up after {dequeue_count} attempts; last error: {reason}", error_type
        )
    if isinstance(error, TransientError) and error.retry_after is not None:
        return Retry(min(error.retry_after, policy.max_delay), reason)
    return Retry(backoff(dequeue_count, policy, jitter=jitter), reason)


# Requests that may have spent their deliveries waiting for their chat's create (within
# ``create_grace`` they run however often they were delivered).
WAITS_FOR_CHAT = frozenset({"assistantPost", "submitToolOutputs"})


def gives_up_in_handler(role: str, message_type: str | None) -> bool:
    """Whether a message stopped by ``check_before_running`` still reaches its handler, told
    to give up (``MessageContext.give_up``), instead of being dead-lettered unseen.

    A run step ends its run failed (the chat's next post starts now, not at the run's
    deadline). A request that may have used its deliveries waiting for its chat says whether
    the chat ever came: if not, it is dead-lettered ``UnknownAssistant`` (the true cause),
    not ``MaxDequeueCountExceeded``. Told to give up, these handlers only read, never do the
    work, so a message that crashes the worker is not run again."""
    return role == "runs" or (role == "requests" and message_type in WAITS_FOR_CHAT)


def check_before_running(
    dequeue_count: int, policy: RetryPolicy, age: float | None = None
) -> DeadLetter | Resend | None:
    """Dead-letter a message delivered more often than allowed before running it again.

    That happens when earlier attempts died with the worker (killed, out of memory) so that
    no failure could be recorded: without this check such a message would crash replicas
    forever. Within the create grace a request may have been delivered many times while it
    waited for its chat (short delays): it is run, and ``decide`` judges it.
    """
    if age is not None and age < policy.create_grace:
        return None
    if dequeue_count > policy.max_dequeue_count:
        reason = (
            f"delivered {dequeue_count} times without finishing (more than "
            f"{policy.max_dequeue_count}); earlier attempts may have crashed the worker"
        )
        if policy.resend_exhausted:
            return Resend(policy.max_delay, reason)
        return DeadLetter(reason, "MaxDequeueCountExceeded")
    return None
