"""From openai SDK exceptions to ``ModelError``: which failures are worth retrying."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.backends.base import ModelError

if TYPE_CHECKING:
    import openai

# Longest Retry-After we honour; longer waits are capped (the run timeout bounds them anyway).
MAX_RETRY_AFTER = 300.0
# Error codes (or types) of an error event inside a stream that are worth retrying: the status
# line was sent long before, so only the event says it was a rate limit or a server failure.
TRANSIENT_STREAM_ERRORS = frozenset(
    {"rate_limit_exceeded", "rate_limit_error", "server_error", "server_overloaded", "overloaded"}
)


def retry_after_seconds(error: openai.APIStatusError) -> float | None:
    """The server's requested delay, from ``retry-after-ms`` or ``retry-after`` (seconds)."""
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(max(float(value) * scale, 0.0), MAX_RETRY_AFTER)
        except ValueError:
            continue
    return None


def classify(error: Exception) -> ModelError:
    """Transient: 408/409/429, 5xx, timeouts and connection errors. Anything else 4xx ends
    the run ``failed`` (bad request, content filter, context length, auth)."""
    import openai  # loaded with the first model call, not at start-up

    if isinstance(error, openai.APITimeoutError):
        return ModelError("the model service timed out", transient=True)
    if isinstance(error, openai.APIConnectionError):
        return ModelError(f"could not reach the model service: {error}", transient=True)
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        message = _message(error)
        if status in (408, 409, 429) or status >= 500:
            return ModelError(
                f"model service answered {status}: {message}",
                transient=True,
                retry_after=retry_after_seconds(error),
                status=status,
            )
        # A 404 is most often a wrong endpoint (OPENAI_BASE_URL, a deployment name): say where.
        where = f" at {_endpoint(error)}" if status == 404 else ""
        return ModelError(
            f"model service refused the request ({status}){where}: {message}",
            transient=False,
            status=status,
        )
    if isinstance(error, openai.APIError):
        # An error event in the middle of a stream (no status of its own).
        body = error.body if isinstance(error.body, dict) else {}
        kinds = {str(body.get("code") or ""), str(body.get("type") or "")}
        if kinds & TRANSIENT_STREAM_ERRORS:
            return ModelError(f"the model's stream failed: {error.message}", transient=True)
        return ModelError(f"the model's stream failed: {error.message}", transient=False)
    return ModelError(f"{type(error).__name__}: {error}", transient=False)


def _message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(error.message)


def _endpoint(error: openai.APIStatusError) -> str:
    """The URL the request went to, without its query (which may carry an api-version)."""
    url = error.response.request.url
    return f"{url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path}"
