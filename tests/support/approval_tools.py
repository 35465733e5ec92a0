"""Tools of the approval tests, a tool module of its own (``WORKER_TOOLS=tests.support.runs,
tests.support.approval_tools``): each execution is counted in the tool log of
``tests.support.runs`` (``RUNS_TOOL_LOG``), across every worker process of a test."""

from __future__ import annotations

from handlers.tools import ToolRegistry, load_tools, tool
from tests.support.runs import THIS_MODULE as RUNS_TOOLS
from tests.support.runs import _log_tool

THIS_MODULE = "tests.support.approval_tools"


@tool
def send_email(to: str, subject: str) -> str:
    """Send an email (not safe to run twice; an assistant asks a person first)."""
    _log_tool("send_email", "start", subject)
    _log_tool("send_email", "end", subject)
    return f"sent to {to}: {subject}"


@tool(approval=True)
def wire_money(amount: int) -> str:
    """Wire money: every call waits for a person's decision, whatever the assistant says."""
    _log_tool("wire_money", "start", str(amount))
    _log_tool("wire_money", "end", str(amount))
    return f"wired {amount}"


def approval_registry() -> ToolRegistry:
    """The weather tools of ``tests.support.runs`` and these."""
    return load_tools([RUNS_TOOLS, THIS_MODULE])
