"""The two kinds of failure the worker tells apart.

A ``PermanentError`` can never succeed however often it is tried (bad input, an unknown
assistant, a name that is not allowed): the message is dead-lettered on its first attempt. Every
other exception is treated as transient and retried with backoff, up to the dequeue limit.
"""

from schemas import InvalidMessage
from schemas.bounded import MAX_REASON_CHARS, cap


class PermanentError(Exception):
    """A request that can never be processed; ``reason`` says what to fix."""

    def __init__(self, reason: str, *, error_type: str = "PermanentError") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


class TransientError(Exception):
    """A failure worth retrying later; ``retry_after`` (seconds) overrides the backoff."""

    def __init__(
        self, reason: str, *, retry_after: float | None = None, error_type: str = "TransientError"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.error_type = error_type


class ChatNotFound(Exception):
    """A post or submit names a chat that does not exist, perhaps not *yet*: queues do not
    keep order, and a producer's create may still be on its way. Retried with short delays
    until ``WORKER_CREATE_GRACE`` after the message was enqueued, then dead-lettered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = "UnknownAssistant"


class StorageUnavailable(TransientError):
    """A storage service did not answer, or answered that it is busy (5xx, 429, a refused or
    dropped connection): not the message's fault. ``setting`` names the connection."""

    def __init__(
        self, reason: str, *, setting: str, error_type: str = "StorageUnavailable"
    ) -> None:
        super().__init__(reason, error_type=error_type)
        self.setting = setting


# Every ``errorType`` a dead letter carries by name, each one cause (docs/reference.md says
# which); a failure that outlasted its attempts otherwise carries its exception's class name.
# The dead-letter counter starts at 0 for each, so that an alert fires on the first.
DEAD_LETTER_TYPES = (
    "InvalidMessage",
    "WrongQueue",
    "UnsupportedMessageType",
    "ReplyToNotAllowed",
    "ConnectionNotAllowed",
    "SettingNotAllowed",
    "UnknownTool",
    "HostedToolsNotSupported",
    "McpServerNotAllowed",
    "UnknownRun",
    "InvalidToolOutputs",
    "InvalidToolApprovals",
    "UnknownAssistant",
    "TooLarge",
    "StorageRequestRejected",
    "StorageUnavailable",
    "StorageAccessDenied",
    "TransientError",
    "MaxDequeueCountExceeded",
)


def describe(error: BaseException) -> str:
    """A one-line description of an error for logs and dead letters, at most
    ``MAX_REASON_CHARS`` long whatever the error carries (a reason may quote a request)."""
    reason = getattr(error, "reason", None)
    if isinstance(error, (PermanentError, TransientError, InvalidMessage, ChatNotFound)) and (
        isinstance(reason, str)
    ):
        return cap(reason, MAX_REASON_CHARS)
    # Only the first line, cut: the text of a foreign exception can quote its whole input.
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return cap(f"{type(error).__name__}: {first}" if first else type(error).__name__)
