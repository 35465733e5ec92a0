"""The poll schedule (worker.queues.polling), on a fake clock: no sleeps, no queues.

``drive`` plays the loop: it sleeps as long as the schedule says, polls what is due and
reports what each receive returned (what ``arrivals`` made visible by then).
"""

import itertools
import random
from collections.abc import Callable

import pytest

from worker.queues.polling import (
    DEADLINES_MAX_CAP,
    RECHECK,
    REQUESTS_WARM,
    RUNS_WARM,
    WARM_WINDOW,
    IdleBackoff,
    PollSchedule,
    policies,
)

RUNS, DEADLINES, REQUESTS = "runs", "deadlines", "requests"
ASK = 16


def schedule(cap: float = 10.0, now: float = 0.0, seed: int = 1) -> PollSchedule:
    return PollSchedule(
        policies(runs=RUNS, deadlines=DEADLINES, requests=REQUESTS, max_polling_interval=cap),
        now,
        random.Random(seed),
    )


Visible = Callable[[str, float], int]


def drive(
    polls: PollSchedule,
    start: float,
    end: float,
    visible: Visible = lambda _queue, _at: 0,
    free: int = ASK,
) -> list[tuple[float, str]]:
    """Run the schedule from ``start`` to ``end``; the (time, queue) of every poll."""
    now = start
    seen: list[tuple[float, str]] = []
    while True:
        wait = polls.sleep(now, free)
        assert wait is not None and wait >= 0
        now += wait
        if now > end:
            return seen
        due = polls.due(now, free)
        assert due, "the schedule said a poll was due"
        for name in due:
            seen.append((now, name))
            polls.polled(name, now, visible(name, now), ASK)


def times(seen: list[tuple[float, str]], queue: str) -> list[float]:
    return [at for at, name in seen if name == queue]


def gaps(values: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(values)]


def test_idle_backoff_grows_from_100ms_to_the_cap_jittered_and_resets() -> None:
    """Empty polls back off exponentially with ±10 % jitter around each step (so the mean
    interval at the cap is the cap); a message resets it, ``resume_from`` climbs from a step."""
    idle = IdleBackoff(maximum=1.0)
    rng = random.Random(7)
    delays = [idle.next_delay(rng) for _ in range(10)]
    assert 0.09 <= delays[0] <= 0.11
    assert 0.18 <= delays[1] <= 0.22
    assert all(0.9 <= d <= 1.1 for d in delays[5:])
    idle.reset()
    assert idle.next_delay(rng) <= 0.11
    idle.resume_from(0.2)
    assert 0.36 <= idle.next_delay(rng) <= 0.44
    assert IdleBackoff(maximum=0.05).next_delay(rng) <= 0.055  # a cap below 100 ms holds


@pytest.mark.parametrize(
    ("cap", "runs", "deadlines"), [(10.0, 20.0, 60.0), (1.0, 2.0, 6.0), (30.0, 60.0, 60.0)]
)
def test_each_queue_has_its_own_cap(cap: float, runs: float, deadlines: float) -> None:
    """Requests: the setting; runs: twice it; deadlines: six times it but at most 60 s."""
    by_name = {
        p.name: p
        for p in policies(
            runs=RUNS, deadlines=DEADLINES, requests=REQUESTS, max_polling_interval=cap
        )
    }
    assert [p.name for p in by_name.values()] == [RUNS, DEADLINES, REQUESTS]
    assert (by_name[REQUESTS].cap, by_name[RUNS].cap, by_name[DEADLINES].cap) == (
        cap,
        runs,
        deadlines,
    )
    assert by_name[DEADLINES].warm is None and not by_name[DEADLINES].wakes
    assert DEADLINES_MAX_CAP == 60.0


def test_a_new_worker_polls_everything_at_once_then_backs_off_per_queue() -> None:
    polls = schedule()
    assert polls.due(0.0, ASK) == [RUNS, DEADLINES, REQUESTS]
    seen = drive(polls, 0.0, 600.0)
    for queue, cap in ((REQUESTS, 10.0), (RUNS, 20.0), (DEADLINES, 60.0)):
        steps = gaps(times(seen, queue))
        assert 0.09 <= steps[0] <= 0.11
        assert all(b > a for a, b in itertools.pairwise(steps[:6]))  # doubling
        assert all(0.9 * cap <= s <= 1.1 * cap for s in steps[-5:])


@pytest.mark.parametrize(("cap", "per_minute"), [(5.0, 20.0), (10.0, 10.0), (30.0, 4.0)])
def test_a_worker_idle_for_long_polls_about_so_often(cap: float, per_minute: float) -> None:
    """All queues together: 60/cap + 60/(2 cap) + 60/min(6 cap, 60) polls a minute (10 at
    the default 10 s, within the target of 12)."""
    polls = schedule(cap)
    polls.activity(0.0)
    seen = drive(polls, 0.0, 1800.0)
    late = [at for at, _ in seen if at >= 600.0]
    rate = len(late) / 20
    assert per_minute * 0.9 <= rate <= per_minute * 1.1
    if cap == 10.0:
        assert rate <= 12


def test_warm_after_activity_then_backing_off_again() -> None:
    """Within 30 s of the last activity the requests queue is polled every 0.2 s and the runs
    queue every second; then both climb back to their caps. Deadlines are not warmed."""
    polls = schedule()
    drive(polls, 0.0, 600.0)  # long idle: at the caps
    polls.activity(600.0)
    seen = drive(polls, 600.0, 700.0)
    requests, runs = times(seen, REQUESTS), times(seen, RUNS)
    assert requests[0] <= 600.0 + REQUESTS_WARM * 1.1
    assert runs[0] <= 600.0 + RUNS_WARM * 1.1
    in_window = [t for t in requests if t < 600.0 + WARM_WINDOW]
    assert all(0.9 * REQUESTS_WARM <= g <= 1.1 * REQUESTS_WARM for g in gaps(in_window))
    assert len(in_window) >= 0.9 * WARM_WINDOW / REQUESTS_WARM
    after = gaps([t for t in requests if t >= 600.0 + WARM_WINDOW])
    assert after[0] <= 2 * 1.1 * REQUESTS_WARM  # the climb starts from the warm interval
    assert all(0.9 * 10 <= g <= 1.1 * 10 for g in after[-3:])
    in_window_runs = [t for t in runs if t < 600.0 + WARM_WINDOW]
    assert all(0.9 * RUNS_WARM <= g <= 1.1 * RUNS_WARM for g in gaps(in_window_runs))
    assert len(times(seen, DEADLINES)) <= 2


@pytest.mark.parametrize("idle", [1.0, 5.0, 30.0, 34.0])
def test_a_post_within_the_warm_window_waits_at_most_the_warm_interval(idle: float) -> None:
    polls = schedule()
    polls.finished(100.0)
    arrives = 100.0 + idle
    taken: list[float] = []

    def visible(queue: str, at: float) -> int:
        if queue == REQUESTS and at >= arrives and not taken:
            taken.append(at)
            return 1
        return 0

    drive(polls, 100.0, arrives + 5.0, visible)
    assert taken and taken[0] - arrives <= REQUESTS_WARM * 1.1


def test_a_full_page_is_followed_by_another_at_once_a_partial_one_not() -> None:
    polls = schedule()
    polls.polled(REQUESTS, 5.0, ASK, ASK)
    assert polls.is_due(REQUESTS, 5.0)
    polls.polled(REQUESTS, 5.0, 3, ASK)
    assert not polls.is_due(REQUESTS, 5.0)
    assert polls.is_due(REQUESTS, 5.0 + REQUESTS_WARM * 1.1)
    # A deadlines backlog (never warm) starts its backoff over.
    polls.polled(DEADLINES, 5.0, ASK, ASK)
    assert polls.is_due(DEADLINES, 5.0)
    polls.polled(DEADLINES, 5.0, 1, ASK)
    assert polls.is_due(DEADLINES, 5.11) and not polls.is_due(DEADLINES, 5.05)


def test_nothing_is_polled_while_every_slot_is_busy() -> None:
    polls = schedule()
    polls.polled(REQUESTS, 1.0, ASK, ASK)  # a backlog, due at once...
    assert polls.due(1.0, 0) == [] and polls.sleep(1.0, 0) is None  # ...but no slot is free
    assert polls.due(1.0, 1) == [RUNS, DEADLINES, REQUESTS]
    assert polls.sleep(1.0, 1) == 0


def test_a_message_finishing_makes_the_runs_queue_due_at_once() -> None:
    """It may have sent a step visible at once; the requests queue is warm again."""
    polls = schedule()
    drive(polls, 0.0, 600.0)
    polls.finished(601.0)
    assert polls.due(601.0, ASK) == [RUNS]
    assert polls.is_due(REQUESTS, 601.0 + REQUESTS_WARM)
    assert not polls.is_due(DEADLINES, 601.5)


def test_a_delayed_message_wakes_its_queue_when_it_falls_due() -> None:
    """Long idle (runs backed off to 20 s): a step due at 700.0 is polled for at 700.0."""
    polls = schedule()
    drive(polls, 0.0, 650.0)
    polls.wake_at(RUNS, 700.0)
    visible_at = 700.0
    got: list[float] = []

    def visible(queue: str, at: float) -> int:
        if queue == RUNS and at >= visible_at and not got:
            got.append(at)
            return 1
        return 0

    drive(polls, 650.0, 720.0, visible)
    assert got == [700.0]


def test_an_early_poll_does_not_meet_a_wake_and_a_missed_one_is_rechecked_once() -> None:
    polls = schedule()
    drive(polls, 0.0, 600.0)
    polls.wake_at(REQUESTS, 610.0)
    polls.polled(REQUESTS, 605.0, 0, ASK)  # before it was due: the wake stays
    assert not polls.is_due(REQUESTS, 609.99) and polls.is_due(REQUESTS, 610.0)
    seen = drive(polls, 605.0, 612.0)  # nothing shows up (another replica took it)
    requests = times(seen, REQUESTS)
    assert requests[:2] == [610.0, 610.0 + RECHECK]
    assert len(requests) == 2  # once only, then the backoff


def test_wakes_for_queues_that_do_not_take_them_are_ignored() -> None:
    polls = schedule()
    drive(polls, 0.0, 600.0)
    polls.wake_at(DEADLINES, 601.0)
    polls.wake_at("replies-of-someone", 601.0)
    assert polls.due(601.0, ASK) == []


def test_a_wake_met_while_slots_were_busy_is_polled_when_one_frees() -> None:
    polls = schedule()
    drive(polls, 0.0, 600.0)
    polls.wake_at(RUNS, 601.0)
    assert polls.sleep(601.5, 0) is None
    assert polls.due(602.0, 1) == [RUNS]
