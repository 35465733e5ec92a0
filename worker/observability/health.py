"""Liveness and readiness of one worker process, as ``/healthz`` and ``/readyz`` report them.

The worker loop marks what it knows: the queues exist (after ``ensure_queues``), it is
draining (after ``stop()``), its own storage is down or up again (the storage-outage pause),
it has stopped. Readiness is the conjunction; the reasons say what is missing.
"""

import time


class Health:
    """What the probes answer. Plain state on the worker's event loop: no locks needed."""

    def __init__(self) -> None:
        self.alive = True
        self.queues_present = False
        self._draining = False
        self._storage_down: str | None = None
        self._storage_down_since: float | None = None

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
        """Whether this worker should be sent work, and if not, why (one sentence each)."""
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
        return not reasons, reasons
