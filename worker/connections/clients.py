"""Azure SDK clients built from a ``StorageConnection``: the only place credentials are used.

Retries are short on purpose (see NOTES: the SDK's default waits 15 s before its first retry);
anything longer goes back to the queue as a delayed retry. With ``requests`` given, every
storage request (each attempt) is reported to it (``assistant_worker_storage_requests_total``).
"""

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueServiceClient

from worker.config.settings import StorageConnection
from worker.connections.counting import CountingTransport, RequestObserver

# Seconds: connect and read timeouts for every storage call.
CONNECTION_TIMEOUT = 10
READ_TIMEOUT = 30


class SharedCredential:
    """The process's one ``DefaultAzureCredential``, for every storage client and the Azure
    OpenAI token provider: one token cache, one managed-identity probe, one set of sessions
    (a credential per client would each fetch and refresh its own tokens).

    Built on first use. ``retain``/``release`` bracket an app's life (``open_app``); the last
    release closes it, and a later use builds a new one. A credential is tied to the event
    loop it was built on (its sessions are): used from another loop (a second
    ``asyncio.run`` in one process) it is replaced, never shared across loops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credential: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holders = 0

    def get(self) -> Any:
        """The credential (built now if there is none for the running loop)."""
        loop = _running_loop()
        with self._lock:
            if self._credential is None or self._loop is not loop:
                from azure.identity.aio import DefaultAzureCredential

                self._credential = DefaultAzureCredential()
                self._loop = loop
            return self._credential

    def retain(self) -> None:
        """One more user that will ``release`` it (an app while it runs)."""
        with self._lock:
            self._holders += 1

    async def release(self) -> None:
        """One user fewer; the last one closes the credential (if one was built)."""
        with self._lock:
            self._holders = max(self._holders - 1, 0)
            if self._holders:
                return
            credential, self._credential, self._loop = self._credential, None, None
        if credential is not None:
            await credential.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


CREDENTIAL = SharedCredential()


def shared_credential() -> Any:
    """The process's ``DefaultAzureCredential`` (see :class:`SharedCredential`)."""
    return CREDENTIAL.get()


# Environment variables through which aiohttp would take a proxy or credentials.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WS_PROXY", "WSS_PROXY", "NETRC")


def uses_environment() -> bool:
    """Whether a proxy or a netrc file is configured for this process. Only then do the
    storage clients read those settings: on each request aiohttp looks them up in a thread,
    two hand-offs per storage request that a worker without a proxy does not need."""
    if any(os.environ.get(name) or os.environ.get(name.lower()) for name in _PROXY_VARIABLES):
        return True
    return Path("~/.netrc").expanduser().exists() or Path("~/_netrc").expanduser().exists()


def _counted(service: str, requests: RequestObserver | None, options: dict[str, Any]) -> None:
    """Send through our own transport (the clients the service derives share it), with the
    timeouts the SDK would have given its own; with ``requests``, one that reports each
    request."""
    timeouts = {
        "connection_timeout": options["connection_timeout"],
        "read_timeout": options["read_timeout"],
        "use_env_settings": uses_environment(),
    }
    if requests is not None:
        options["transport"] = CountingTransport(service, requests, **timeouts)
    else:
        options["transport"] = AioHttpTransport(**timeouts)


def queue_service(
    connection: StorageConnection, requests: RequestObserver | None = None
) -> QueueServiceClient:
    """An async queue service client with a short retry policy."""
    options: dict[str, Any] = {
        # The client builds its async ExponentialRetry from these: waits of 0.5 s, then
        # 0.5 + 1^n s, instead of the default 15 s, 18 s, 24 s.
        "initial_backoff": 0.5,
        "increment_base": 1,
        "random_jitter_range": 0.5,
        "retry_total": 3,
        "connection_timeout": CONNECTION_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
    }
    _counted("queue", requests, options)
    if connection.connection_string:
        return QueueServiceClient.from_connection_string(connection.connection_string, **options)
    if not connection.queue_service_uri:
        raise ValueError(f"{connection.setting}__queueServiceUri or __accountName is not set")
    return QueueServiceClient(
        connection.queue_service_uri, credential=shared_credential(), **options
    )


def table_service(
    connection: StorageConnection, requests: RequestObserver | None = None
) -> TableServiceClient:
    """An async table service client with a short retry policy."""
    options: dict[str, Any] = {
        "retry_total": 3,
        "retry_backoff_factor": 0.4,
        "retry_backoff_max": 4,
        "connection_timeout": CONNECTION_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
    }
    _counted("table", requests, options)
    if connection.connection_string:
        return TableServiceClient.from_connection_string(connection.connection_string, **options)
    if not connection.table_service_uri:
        raise ValueError(f"{connection.setting}__tableServiceUri or __accountName is not set")
    return TableServiceClient(
        connection.table_service_uri, credential=shared_credential(), **options
    )
