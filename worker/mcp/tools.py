"""MCP tools as the model is offered them: named ``{server}__{tool}``, with the server's JSON
Schema, and their arguments checked against it.

No SDK here: the handlers import these without loading ``mcp``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A function name OpenAI accepts.
MAX_FUNCTION_NAME = 64
SEPARATOR = "__"
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]")
# Validation errors shown to the model at most, and the length of each.
MAX_ERRORS_SHOWN = 10
MAX_ERROR_CHARS = 300


def function_name(server: str, tool: str) -> str:
    """The name the model calls a server's tool by: ``{server}__{tool}``, with characters
    OpenAI does not take in a name (``.``, ``/``, ...) written ``_``."""
    return f"{server}{SEPARATOR}{_NOT_IN_NAMES.sub('_', tool)}"


def server_of(function: str) -> str | None:
    """The server a function name points to (``weather`` of ``weather__get``), or None."""
    server, separator, tool = function.partition(SEPARATOR)
    return server if separator and server and tool else None


@dataclass(frozen=True, eq=False)
class McpTool:
    """One tool of one server, as the model is offered it."""

    server: str
    # Its name on the server (what tools/call sends).
    name: str
    # What the model calls it: {server}__{name}.
    function: str
    description: str
    # The server's input JSON Schema (an object at the root).
    parameters: Mapping[str, Any]
    # Safe to run again after a crash interrupted a call (read-only or idempotent).
    rerun_safe: bool
    validator: Any

    def definition(self) -> dict[str, Any]:
        """The Chat Completions tool definition (a copy: backends may add keys)."""
        return {
            "type": "function",
            "function": {
                "name": self.function,
                "description": self.description,
                "parameters": copy.deepcopy(dict(self.parameters)),
            },
        }

    def check(self, arguments: Mapping[str, Any]) -> str | None:
        """What is wrong with ``arguments`` for the server's schema, or None."""
        errors = sorted(
            self.validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path]
        )
        if not errors:
            return None
        parts = []
        for error in errors[:MAX_ERRORS_SHOWN]:
            where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
            parts.append(f"{where}: {cut(str(error.message), MAX_ERROR_CHARS)}")
        if len(errors) > MAX_ERRORS_SHOWN:
            parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
        return "; ".join(parts)


@dataclass(frozen=True)
class McpListing:
    """A server's tools, and the names of those that cannot be offered (and why)."""

    server: str
    tools: tuple[McpTool, ...]
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class McpResult:
    """A ``tools/call`` answer: its text for the model, and whether the tool failed."""

    text: str
    is_error: bool


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
