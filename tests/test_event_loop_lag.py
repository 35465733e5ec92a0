"""The event loop's lag: a loop held by one callback shows in
``assistant_worker_event_loop_lag_seconds`` and, above the threshold, as an
``event_loop.lagging`` warning; a worker's app runs the monitor while it is open."""

import time

import structlog

from tests.support.env import StorageEnv, run
from tests.support.runs import eventually
from tests.support.scrape import http_settings, parse_metrics, scrape, total, value
from worker.app import open_app
from worker.observability.lag import LagMonitor, lag_of
from worker.observability.metrics import Metrics

LAG = "assistant_worker_event_loop_lag_seconds"


def test_lag_is_how_late_the_timer_fired() -> None:
    assert lag_of(10.0, 10.25, 0.25) == 0.0
    assert lag_of(10.0, 11.75, 0.25) == 1.5
    assert lag_of(10.0, 10.2, 0.25) == 0.0  # early wake-ups are no lag


def test_a_held_loop_is_measured_and_warned_about() -> None:
    """A callback that holds the loop 0.4 s (``time.sleep`` on the loop: the fault under
    test) is one sample of about 0.4 s in the histogram and one warning over a 0.2 s
    threshold; the samples before and after are small."""
    metrics = Metrics()

    async def scenario() -> LagMonitor:
        monitor = LagMonitor(metrics.observe_event_loop_lag, interval=0.02, warn_after=0.2)
        monitor.start()
        try:

            async def sampled() -> bool:
                return total(parse_metrics(metrics.render().decode()), f"{LAG}_count") >= 3

            await eventually(sampled, 5, "three samples")
            time.sleep(0.4)  # noqa: ASYNC251 (the fault under test: a callback holds the loop)
            await eventually(lambda: _above(metrics, "0.25"), 5, "the held loop's sample")
        finally:
            await monitor.stop()
        return monitor

    with structlog.testing.capture_logs() as logs:
        monitor = run(scenario())
    assert 0.35 <= monitor.max_lag < 2.0, monitor.max_lag
    warnings = [log for log in logs if log["event"] == "event_loop.lagging"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["log_level"] == "warning"
    assert 0.35 <= warnings[0]["lag_seconds"] < 2.0
    assert warnings[0]["threshold_seconds"] == 0.2


async def _above(metrics: Metrics, bucket: str) -> bool:
    """Whether a sample is larger than the histogram's bucket ``bucket`` (its upper bound)."""
    samples = parse_metrics(metrics.render().decode())
    return value(samples, f"{LAG}_bucket", le=bucket) < total(samples, f"{LAG}_count")


def test_the_app_reports_the_lag_while_it_is_open(storage: StorageEnv) -> None:
    """A worker's ``/metrics`` has the histogram, filling while the app is open."""

    async def scenario() -> None:
        async with open_app(http_settings(storage)) as app:

            async def sampled() -> bool:
                return total(await scrape(app), f"{LAG}_count") >= 2

            await eventually(sampled, 10, "two lag samples on /metrics")
            samples = await scrape(app)
            assert value(samples, f"{LAG}_bucket", le="1.0") == total(samples, f"{LAG}_count")

    run(scenario())
