"""Liveness and readiness of one worker process, as ``/healthz`` and ``/readyz`` report them.

The worker loop marks what it knows: the queues exist (after ``ensure_queues``), it is
draining (after ``stop()``), its own storage is down or up again (the storage-outage pause),
it has stopped. Readiness is the conjunction; the reasons say what is missing.

Stuck tool threads (a sync tool that hung past its timeout, see ``handlers.tools.ToolThreads``)
make the worker *degraded*, not unready: it still takes work and runs every tool (a new
thread took the stuck one's place), so a 503 would only take a working replica out of its
Service and hide it from the query, and a restart would cut the runs of every other chat it
holds. ``/readyz`` says so in its reasons (still 200), and the metric
``assistant_worker_tool_threads_stuck`` is what to alert on: the tool needs a timeout of its
own, and a restart frees the threads.
"""

import time
from collections.abc import Callable


class Health:
    """What the probes answer. Plain state on the worker's event loop: no locks needed."""

    def __init__(self) -> None:
        self.alive = True
        self.queues_present = False
        self._draining = False
        self._storage_down: str | None = None
        self._storage_down_since: float | None = None
        self._stuck_tool_threads: Callable[[], int] = lambda: 0

    def mark_storage_down(self, reason: str) -> None:
        """The worker's own storage fails every request alike: receiving is paused."""
        if self._storage_down is None:
            self._storage_down_since = time.monotonic()
        self._storage_down = reason

    def mark_storage_up(self) -> None:
        """Storage answers again."""
        self._storage_down = None
        self._storage_down_since = None

    def storage_changed(self, ok: bool, reason: str) -> None:
        """A storage gate's listener: up when ``ok``, else down for ``reason``."""
        if ok:
            self.mark_storage_up()
        else:
            self.mark_storage_down(reason)

    def track_tool_threads(self, stuck: Callable[[], int]) -> None:
        """Read the number of stuck tool threads from ``stuck`` at each probe (it changes on
        the tools' threads)."""
        self._stuck_tool_threads = stuck

    def mark_draining(self) -> None:
        """``stop()`` was called: no new messages are taken, in-flight ones finish."""
        self._draining = True

    def mark_stopped(self) -> None:
        """The loop has ended (drained): the process is about to exit."""
        self.alive = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def storage_down(self) -> bool:
        return self._storage_down is not None

    @property
    def storage_down_reason(self) -> str | None:
        return self._storage_down

    def ready(self) -> tuple[bool, list[str]]:
        """Whether this worker should be sent work, and if not, why (one sentence each);
        when it should, the reasons say what is degraded (stuck tool threads), if anything."""
        reasons: list[str] = []
        if not self.alive:
            reasons.append("the worker loop has stopped")
        if self._draining:
            reasons.append("draining: shutting down after a stop signal")
        if self._storage_down is not None:
            since = self._storage_down_since
            elapsed = f" for {time.monotonic() - since:.0f} s" if since is not None else ""
            reasons.append(f"storage unreachable{elapsed}: {self._storage_down}")
        if not self.queues_present:
            reasons.append("the work queues are not yet checked or created")
        return not reasons, reasons + self._degraded()

    def _degraded(self) -> list[str]:
        stuck = self._stuck_tool_threads()
        if not stuck:
            return []
        return [
            f"degraded: {stuck} tool thread(s) stuck in sync tools that ran past their timeout "
            "(replaced, so tools still run; a restart frees them)"
        ]
