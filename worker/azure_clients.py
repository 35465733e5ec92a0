"""Azure SDK clients built from a ``StorageConnection``: the only place credentials are used.

Retries are short on purpose (see NOTES: the SDK's default waits 15 s before its first retry);
anything longer goes back to the queue as a delayed retry. With ``requests`` given, every
storage request (each attempt) is reported to it (``assistant_worker_storage_requests_total``).
"""

from typing import Any

from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueServiceClient

from worker.observability.storage import CountingTransport, RequestObserver
from worker.settings import StorageConnection

# Seconds: connect and read timeouts for every storage call.
CONNECTION_TIMEOUT = 10
READ_TIMEOUT = 30


def _credential() -> Any:
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


def _counted(service: str, requests: RequestObserver | None, options: dict[str, Any]) -> None:
    """Send through a transport that reports each request (the clients the service derives
    share it), with the timeouts the SDK would have given its own."""
    if requests is not None:
        options["transport"] = CountingTransport(
            service,
            requests,
            connection_timeout=options["connection_timeout"],
            read_timeout=options["read_timeout"],
        )


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
    return QueueServiceClient(connection.queue_service_uri, credential=_credential(), **options)


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
    return TableServiceClient(connection.table_service_uri, credential=_credential(), **options)
