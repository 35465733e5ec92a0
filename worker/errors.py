"""The two kinds of failure the worker tells apart.

A ``PermanentError`` can never succeed however often it is tried (bad input, an unknown
assistant, a name that is not allowed): the message is dead-lettered on its first attempt. Every
other exception is treated as transient and retried with backoff, up to the dequeue limit.
"""


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
