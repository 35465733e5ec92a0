"""What can go wrong with a request to an MCP server, told in one line.

No SDK here: the handlers import these without loading ``mcp``.
"""

# Texts of errors are cut to this: they go to the model and into the history.
MAX_REASON_CHARS = 300


class McpError(Exception):
    """A request to an MCP server failed. The message is one line: it names neither the
    server's URL nor its token."""


class McpUnavailable(McpError):
    """The server could not be reached, or the session broke."""


class McpRefused(McpError):
    """The server answered the request with a protocol error (an unknown tool, say), or with
    an answer that is not MCP."""


def reason_of(error: BaseException) -> str:
    """The innermost cause of a failure (the transport's task group wraps it in exception
    groups), as ``Type: message``, one line, short."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
