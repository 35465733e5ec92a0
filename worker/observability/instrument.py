"""Metrics around the model backends, without touching them.

``InstrumentedBackend`` wraps a ``Backend``: each ``begin``/``poll`` is timed and its outcome
and token usage reported; every other attribute is the wrapped backend's. The ``model`` label
is bounded (``BoundedLabels``): a request's ``chatModel`` is the producer's choice.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from worker.backends.base import Backend, BackendWrapper, ModelError, TurnRequest
from worker.observability.labels import BoundedLabels
from worker.runs.model import ModelTurn, Pending

if TYPE_CHECKING:
    # prometheus-client loads only when metrics are on (WORKER_HTTP_PORT).
    from worker.observability.metrics import Metrics


class InstrumentedBackend(BackendWrapper):
    """A backend that reports each model call to ``metrics``; otherwise the backend itself."""

    def __init__(
        self, backend: Backend, metrics: Metrics, models: BoundedLabels | None = None
    ) -> None:
        super().__init__(backend)
        self._metrics = metrics
        self._models = models if models is not None else BoundedLabels()

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        return await self._observed(self._backend.begin, request)

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        return await self._observed(self._backend.poll, request)

    async def _observed(self, call: Any, request: TurnRequest) -> ModelTurn | Pending:
        started = time.monotonic()
        outcome = "error"
        result: ModelTurn | Pending | None = None
        try:
            result = await call(request)
        except ModelError as error:
            outcome = "transient_error" if error.transient else "error"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        else:
            outcome = "answered" if isinstance(result, ModelTurn) else "pending"
            return result
        finally:
            usage = result.usage if isinstance(result, ModelTurn) else None
            self._metrics.observe_model_call(
                self.name,
                self._models(request.model or "unknown"),
                outcome,
                time.monotonic() - started,
                input_tokens=usage.prompt_tokens if usage else 0,
                output_tokens=usage.completion_tokens if usage else 0,
            )


def instrument_backends(
    backends: dict[str, Backend], metrics: Metrics | None, models: BoundedLabels | None = None
) -> dict[str, Backend]:
    """The backends, each wrapped when metrics are on (unchanged when off); ``models`` bounds
    the model label (the process's one instance, shared with the traces)."""
    if metrics is None:
        return backends
    models = models if models is not None else BoundedLabels()
    return {
        name: InstrumentedBackend(backend, metrics, models) for name, backend in backends.items()
    }
