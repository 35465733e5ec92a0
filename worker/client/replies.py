"""Waiting for reply events on a reply queue (``assistantReply``; ``toolCallsRequired`` and
``toolApprovalRequired`` are shown as they pass)."""

import asyncio
from collections.abc import Callable
from typing import Any

from schemas import InvalidMessage, decode_body
from worker.queues.transport import Broker

POLL_INTERVAL = 0.3


async def wait_for_reply(
    broker: Broker,
    queue: str,
    *,
    request_id: str,
    within: float,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
) -> dict[str, Any] | None:
    """The ``assistantReply`` for ``request_id``, or None after ``within`` seconds.

    Every event read is passed to ``on_event`` (tool calls to answer, replies to other
    requests) and deleted: the reply queue is the caller's own.
    """
    replies = broker.queue(queue)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        for delivery in await replies.receive(32, 30):
            await replies.complete(delivery)
            try:
                event = decode_body(delivery.body)
            except InvalidMessage:
                continue
            on_event(event)
            if event.get("type") == "assistantReply" and event.get("requestId") == request_id:
                return event
        await asyncio.sleep(POLL_INTERVAL)
    return None
