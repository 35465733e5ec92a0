"""How the table service's failures are classified, saying where they happened: a refusal is
permanent, an unreachable or busy service is ``StorageUnavailable`` (the loop pauses when it is
the worker's own storage). Every module of the store that calls the service uses it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from worker.loop.errors import PermanentError, StorageUnavailable, TransientError, describe

# The error code of a request to a table that does not exist (404).
TABLE_NOT_FOUND = "TableNotFound"

# Status codes of requests the service will refuse however often they are sent.
_PERMANENT_STATUS = {400, 413}


@asynccontextmanager
async def storage_errors(action: str, where: str, setting: str) -> AsyncIterator[None]:
    """Classify the table service's failures, saying where they happened.

    A refusal of the request itself (400, 413) is permanent. An unreachable or busy service
    (no connection, 5xx, 429) is ``StorageUnavailable`` (the loop pauses when it is the
    worker's own storage); an authentication failure is transient. Both name the storage
    setting and table, so that a dead letter says which connection to fix. Anything else
    (404, 409, 412) passes through for the caller to handle.
    """
    try:
        yield
    except HttpResponseError as error:
        status = error.status_code or 0
        code = getattr(error, "error_code", None)
        if status in _PERMANENT_STATUS:
            raise PermanentError(
                f"{where}: the table service refused to {action}: {code or error.reason}",
                error_type="StorageRequestRejected",
            ) from error
        if status >= 500 or status == 429:
            raise StorageUnavailable(
                f"{where}: could not {action}: {describe(error)}", setting=setting
            ) from error
        if status in (401, 403):
            # The key, SAS or role is wrong (or not yet granted): retried, it may be fixed.
            raise TransientError(
                f"{where}: could not {action}: {describe(error)}", error_type="StorageAccessDenied"
            ) from error
        raise
    except (ServiceRequestError, ServiceResponseError) as error:
        raise StorageUnavailable(
            f"{where}: could not {action}: {describe(error)}", setting=setting
        ) from error


def table_missing(error: BaseException) -> bool:
    """Whether ``error`` says the table does not exist (only a create makes tables: a post,
    submit or delete naming another ``collectionName`` finds none)."""
    return (
        isinstance(error, HttpResponseError)
        and error.status_code == 404
        # A str enum (TableErrorCode) or a plain string: equal to the code either way.
        and getattr(error, "error_code", None) == TABLE_NOT_FOUND
    )
