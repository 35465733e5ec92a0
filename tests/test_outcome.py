"""The pure retry/dead-letter decision and the backoff schedules."""

from schemas import InvalidMessage
from worker.loop.errors import PermanentError, TransientError
from worker.loop.outcome import (
    Complete,
    DeadLetter,
    Resend,
    Retry,
    RetryPolicy,
    backoff,
    check_before_running,
    decide,
)

POLICY = RetryPolicy(max_dequeue_count=5, base_delay=2.0, max_delay=30.0)


class TestDecide:
    def test_success_completes(self) -> None:
        """No error: the message is deleted."""
        assert decide(None, 1, POLICY) == Complete()

    def test_permanent_error_dead_letters_on_first_attempt(self) -> None:
        """A permanent error is never retried."""
        outcome = decide(
            PermanentError("unknown assistant 'x'", error_type="UnknownAssistant"), 1, POLICY
        )
        assert outcome == DeadLetter("unknown assistant 'x'", "UnknownAssistant")

    def test_invalid_message_dead_letters_on_first_attempt(self) -> None:
        """Undecodable input is permanent."""
        outcome = decide(InvalidMessage("not JSON"), 1, POLICY)
        assert isinstance(outcome, DeadLetter)
        assert outcome.error_type == "InvalidMessage"

    def test_transient_error_retries_with_exponential_backoff(self) -> None:
        """Attempts 1..4 are retried after 2, 4, 8, 16 s."""
        delays = [decide(ConnectionError("reset"), n, POLICY) for n in range(1, 5)]
        assert delays == [Retry(d, "ConnectionError: reset") for d in (2.0, 4.0, 8.0, 16.0)]

    def test_last_attempt_dead_letters_with_the_last_error(self) -> None:
        """At the dequeue limit the message goes to the poison queue, saying why."""
        outcome = decide(TimeoutError("table timed out"), 5, POLICY)
        assert isinstance(outcome, DeadLetter)
        assert "after 5 attempts" in outcome.reason
        assert "table timed out" in outcome.reason
        assert outcome.error_type == "TimeoutError"

    def test_retry_after_wins_but_is_capped(self) -> None:
        """A server's Retry-After replaces the backoff, within the policy's cap."""
        assert decide(TransientError("429", retry_after=7), 1, POLICY) == Retry(7, "429")
        assert decide(TransientError("429", retry_after=900), 1, POLICY) == Retry(30.0, "429")


class TestBackoff:
    def test_is_capped(self) -> None:
        """The delay never exceeds the cap, however many attempts."""
        assert backoff(50, POLICY) == 30.0

    def test_jitter_adds_at_most_a_fifth(self) -> None:
        """Jitter spreads retries of replicas that failed together."""
        assert backoff(1, POLICY, jitter=0.0) == 2.0
        assert 2.0 < backoff(1, POLICY, jitter=0.99) < 2.4


def test_messages_delivered_too_often_are_dead_lettered_before_running() -> None:
    """A message whose earlier attempts crashed the worker is not run again."""
    assert check_before_running(5, POLICY) is None
    outcome = check_before_running(6, POLICY)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "MaxDequeueCountExceeded"


class TestNeverDeadLettered:
    """A run's watchdog (the deadlines queue's policy) is never dead-lettered for lack of
    attempts: a fresh copy goes out instead (SPEC §5)."""

    WATCHDOG = RetryPolicy(
        max_dequeue_count=5, base_delay=2.0, max_delay=30.0, resend_exhausted=True
    )

    def test_exhausted_attempts_send_a_fresh_copy(self) -> None:
        """The last attempt's transient failure: a copy after ``max_delay``, not a dead letter."""
        outcome = decide(TimeoutError("table"), 5, self.WATCHDOG)
        assert isinstance(outcome, Resend)
        assert outcome.delay == 30.0 and "TimeoutError: table" in outcome.reason

    def test_earlier_attempts_retry_as_usual(self) -> None:
        assert decide(TimeoutError("table"), 2, self.WATCHDOG) == decide(
            TimeoutError("table"), 2, POLICY
        )

    def test_permanent_errors_are_still_dead_lettered(self) -> None:
        """A message that can never succeed (bad input) is not a watchdog worth keeping."""
        assert isinstance(decide(InvalidMessage("not JSON"), 1, self.WATCHDOG), DeadLetter)

    def test_too_many_deliveries_send_a_fresh_copy_without_running(self) -> None:
        """The crash guard: a copy after ``max_delay`` instead of a dead letter."""
        outcome = check_before_running(6, self.WATCHDOG)
        assert isinstance(outcome, Resend) and outcome.delay == 30.0
        assert isinstance(check_before_running(6, POLICY), DeadLetter)
