"""The tools of the approvals benchmark (``WORKER_TOOLS=bench.approval_tools``): one that must
not run twice (it "sends mail") and one that is safe to repeat (a lookup)."""

from __future__ import annotations

from handlers.tools import tool


@tool
def send_email(to: str, subject: str) -> str:
    """Send an email (not safe to run twice)."""
    return f"sent to {to}: {subject}"


@tool(idempotent=True)
def lookup_order(order_id: int) -> str:
    """Look an order up (safe to run again)."""
    return f"order {order_id} shipped"
