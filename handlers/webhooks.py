"""What a provider's webhook means for a run: ``response.completed|failed|cancelled|incomplete``
of a background response (SPEC §5.1).

The event names only the response. Its run is found from the response's metadata (the
``responses`` backend remembers what it created, or reads it back from the API), the run is read
from its chat's table, and when it is polling that very response, the step that polls it is
sent due now: the step handler then polls and goes on. Nothing else changes: a webhook is a
hint that saves waiting for the next scheduled poll, never the source of truth, so duplicates,
replays, forged metadata and events for runs that are unknown, finished or elsewhere leave
everything as it was (a step sent for a run that moved on meanwhile is stale, and stale steps
do nothing). A webhook that arrives before the create's step has stored the response it
started is ``early``: the caller checks again a moment later.
"""

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from handlers.services import ChatRef, RunServices
from handlers.transitions import step_send
from schemas import RunStep
from worker.backends.responses import RESPONSE_ID
from worker.loop.errors import PermanentError
from worker.loop.handling import Send
from worker.runs.model import Run

# The events that end a background response (the others are acknowledged and ignored).
RESPONSE_ENDED = frozenset(
    {"response.completed", "response.failed", "response.cancelled", "response.incomplete"}
)
API = "responses"

Outcome = Literal[
    "continued",  # the run's polling step is sent, due now
    "early",  # the run has not stored the response yet: check again shortly
    "finished",  # the run has ended: nothing to do
    "moved_on",  # the run is not polling this response (an older one, or another step)
    "unknown",  # no such run (or chat, or table), or the response is not the worker's
]


@dataclass(frozen=True)
class WebhookResult:
    """What a webhook did: its outcome and, when it continues a run, the step to send."""

    outcome: Outcome
    send: Send | None = None
    run_id: str | None = None


def wake(run: Run | None, response_id: str) -> Outcome:
    """Pure: what an ended ``response_id`` means for ``run``."""
    if run is None or run.api != API:
        return "unknown"
    if run.finished:
        return "finished"
    polled = run.handle.get(RESPONSE_ID)
    if run.phase == "poll" and polled == response_id:
        return "continued"
    if run.phase == "model" and polled != response_id:
        # Its create may have returned this response and not stored it yet.
        return "early"
    return "moved_on"


class Locator(Protocol):
    """What the responses backend offers the webhooks (``ResponsesBackend.locate``)."""

    async def locate(self, response_id: str) -> dict[str, str] | None: ...


class WebhookHandler:
    """Turns an ended response into the step that continues its run, if any."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    def _locator(self) -> Locator | None:
        backend: Any = self._services.backends.get(API)
        return backend if backend is not None and hasattr(backend, "locate") else None

    async def __call__(self, response_id: str) -> WebhookResult:
        """Raises what the store or the model API raise when they do not answer (the caller
        answers the provider 503: it delivers again later)."""
        locator = self._locator()
        found = await locator.locate(response_id) if locator is not None else None
        if found is None:
            return WebhookResult("unknown")
        try:
            # The names select only what is allowed: the same checks as a queued step's.
            step = RunStep.model_validate(
                {
                    "type": "runStep",
                    "id": found.get("chatId"),
                    "runId": found.get("runId"),
                    "step": 0,
                    "collectionName": found.get("collectionName"),
                    "chatStorageConnectionSetting": found.get("chatStorageConnectionSetting"),
                }
            )
        except ValidationError:
            return WebhookResult("unknown")
        chat = ChatRef(step.id, step.chat_storage_connection_setting, step.collection_name)
        try:
            # Never creates a table (only a create does): a webhook only reads.
            store = await self._services.store(chat)
        except PermanentError:
            return WebhookResult("unknown")  # a storage setting that is not allowed here
        run = await store.load_run(step.id, step.run_id)
        outcome = wake(run, response_id)
        if outcome != "continued" or run is None:
            return WebhookResult(outcome, run_id=step.run_id)
        return WebhookResult(outcome, step_send(self._services, chat, run), run.run_id)
