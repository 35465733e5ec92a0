"""A shared access signature for the queue service of a storage account, signed with the
account key of its connection string (Azurite's well-known one included): what a producer
without an SDK (curl and the REST API) needs. An adapter of the Azure SDK."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from azure.storage.queue import (
    AccountSasPermissions,
    QueueServiceClient,
    ResourceTypes,
    generate_account_sas,
)

from worker.config.settings import StorageConnection


class NoAccountKey(Exception):
    """The connection has no account key to sign with (identity-based, or a SAS already)."""


@dataclass(frozen=True)
class QueueSas:
    """The queue endpoint and a token for it (without the leading ``?``)."""

    service_url: str
    token: str
    expiry: datetime


def queue_account_sas(connection: StorageConnection, now: datetime, hours: float) -> QueueSas:
    """An account SAS for the queue service: the service, container and object resource types
    with read, add, create, process and delete (create and send requests, create a reply queue,
    read and delete replies), valid for ``hours`` from ``now``."""
    if not connection.connection_string:
        raise NoAccountKey(
            f"{connection.setting} is identity-based (no connection string): there is no account "
            "key to sign a SAS with here; use `az storage account generate-sas`"
        )
    client = QueueServiceClient.from_connection_string(connection.connection_string)
    # The shared-key policy the SDK built from the connection string holds the key.
    key = getattr(client.credential, "account_key", None)
    if not isinstance(key, str) or not key:
        raise NoAccountKey(
            f"the connection string of {connection.setting} has no AccountKey: a SAS can only be "
            "signed with one (a connection string with a SAS already grants what it grants)"
        )
    expiry = now + timedelta(hours=hours)
    token = generate_account_sas(
        client.account_name or "",
        key,
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(
            read=True, add=True, create=True, process=True, delete=True
        ),
        expiry=expiry,
    )
    return QueueSas(client.url.rstrip("/"), token, expiry)
