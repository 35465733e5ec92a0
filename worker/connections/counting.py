"""Counting the storage requests the worker makes (every attempt, retries included).

The count sits in the HTTP transport rather than in a pipeline policy: neither SDK passes
``per_retry_policies`` on to the clients it derives (``QueueServiceClient`` ignores the keyword,
and ``TableServiceClient.get_table_client`` rebuilds its pipeline without it), while both hand
their transport down to every derived client. The transport sees each attempt after the retry
policy, with its method and status, or the error when no response came.
"""

from collections.abc import Callable
from typing import Any

from azure.core.pipeline.transport import AioHttpTransport

# (service "queue" or "table", HTTP method, status code or "error")
RequestObserver = Callable[[str, str, str], None]


class CountingTransport(AioHttpTransport):  # type: ignore[misc]
    """``AioHttpTransport`` that reports each request to ``observer`` once it is answered."""

    def __init__(self, service: str, observer: RequestObserver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._service = service
        self._observer = observer

    async def send(self, request: Any, **kwargs: Any) -> Any:
        method = str(getattr(request, "method", "") or "").upper() or "UNKNOWN"
        try:
            response = await super().send(request, **kwargs)
        except Exception:
            self._observer(self._service, method, "error")
            raise
        self._observer(self._service, method, str(getattr(response, "status_code", "error")))
        return response
