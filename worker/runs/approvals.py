"""Which tool calls wait for a person's decision before they run, and which MCP server a call
goes to (SPEC §5.5). Pure: built from an assistant's stored defaults, no I/O.

A call needs approval when its tool is named in the assistant's ``approvalRequired`` (or that
is ``"all"``), or when its registered tool says ``@tool(approval=True)``. Names are compared as
they are offered to the model, so a tool of an MCP server is named ``{server}__{tool}``, like
any other function.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# ``approvalRequired: "all"``: every call of the assistant waits for a decision.
ALL = "all"
# How the function of an MCP server's tool is named: ``{server}{SEPARATOR}{tool}``.
SEPARATOR = "__"


@dataclass(frozen=True)
class ApprovalPolicy:
    """The tools of one assistant whose calls need a decision, and its MCP servers."""

    every: bool = False
    names: frozenset[str] = frozenset()
    servers: frozenset[str] = frozenset()

    def needs(self, name: str) -> bool:
        """Whether a call of the tool ``name`` waits for a decision before it runs."""
        return self.every or name in self.names

    def server_of(self, name: str) -> str | None:
        """The MCP server a ``server__tool`` name belongs to (one of the assistant's
        ``mcpServers``), else None (a local or external tool)."""
        found = [
            s for s in self.servers if name.startswith(s + SEPARATOR) and len(name) > len(s) + 2
        ]
        return max(found, key=len) if found else None

    @classmethod
    def of(cls, defaults: Mapping[str, Any], flagged: Iterable[str] = ()) -> "ApprovalPolicy":
        """The policy of an assistant from its stored defaults (``approvalRequired``,
        ``mcpServers``); ``flagged``: the registered tools declared ``@tool(approval=True)``."""
        required = defaults.get("approvalRequired")
        names = set(flagged)
        if isinstance(required, list):
            names.update(str(name) for name in required)
        return cls(
            every=required == ALL,
            names=frozenset(names),
            servers=frozenset(mcp_server_names(defaults.get("mcpServers"))),
        )


def mcp_server_names(entries: Any) -> list[str]:
    """The server names of an assistant's ``mcpServers``: names, or ``{name, allowedTools}``
    objects (anything else is ignored)."""
    if not isinstance(entries, list):
        return []
    names = []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            names.append(str(entry["name"]))
    return names
