"""The chaos soak's local tools (``WORKER_TOOLS=bench.chaos_tools``): ``chaos_local``, and
``chaos_approve``, whose calls wait for the producer's decision (the chats name it in
``approvalRequired``).

Tools never learn their call id, so each call carries a unique ``tag`` (see
``bench.chaos_model``); every execution appends a ``start`` and an ``end`` line to the file
named by ``CHAOS_TOOL_LOG`` (one JSON object per line, ``O_APPEND`` keeps lines whole across
the worker processes), and the audit counts executions per tag.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from handlers.tools import tool

TOOL_LOG_ENV = "CHAOS_TOOL_LOG"


def _record(event: str, tag: str) -> None:
    path = os.environ.get(TOOL_LOG_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "tag": tag, "pid": os.getpid(), "t": time.time()})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@tool
async def chaos_local(tag: str, seconds: float = 0.0) -> str:
    """Record one execution of the call tagged ``tag`` (after ``seconds``) and return ``ok <tag>``."""
    _record("start", tag)
    if seconds > 0:
        await asyncio.sleep(seconds)
    _record("end", tag)
    return f"ok {tag}"


@tool
async def chaos_approve(tag: str) -> str:
    """Record one execution of the approved call tagged ``tag`` and return ``ok <tag>`` (not
    safe to run twice: it runs only once a person said yes)."""
    _record("start", tag)
    _record("end", tag)
    return f"ok {tag}"
