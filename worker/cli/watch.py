"""``assistant-worker watch ID REQUEST_ID``: follow a streamed request's output as it comes.

From the request's Redis stream when ``WORKER_STREAM_REDIS_URL`` is set (from its start, so a
watcher that comes late or lost its connection sees everything), else from a reply queue
(``--reply-to``; the events of the request are taken off it). The text is printed as the
model writes it, by the consumer rule of SPEC §4.5 (``worker.client.stream``); the command
ends with the reply, and exits 0 if the run completed.
"""

import argparse
import asyncio
import sys
from typing import Any

from worker.cli.common import CliError, add_queue_flags, print_json
from worker.client.stream import EventSource, QueueEvents, RedisEvents, follow
from worker.config.settings import Settings
from worker.connections.clients import queue_service
from worker.queues.azure import AzureQueueBroker
from worker.queues.transport import Broker


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "watch",
        help="follow a streamed request's output as it comes",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument("id", help="assistant (chat) id")
    parser.add_argument("request_id", help="the post's requestId")
    parser.add_argument("--reply-to", metavar="QUEUE",
                        help="read the post's replyTo queue (when streams do not go to Redis)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the reply (default 300)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the reply as JSON at the end")
    add_queue_flags(parser)
    parser.set_defaults(handler=watch_command)


def watch_command(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.stream_redis_url and not args.reply_to:
        raise CliError(
            "streams go to the replyTo queue unless WORKER_STREAM_REDIS_URL is set: give "
            "--reply-to QUEUE, or set WORKER_STREAM_REDIS_URL",
            exit_code=2,
        )

    async def watch() -> int:
        broker = AzureQueueBroker(queue_service(settings.default_storage))
        try:
            return await print_stream(
                settings,
                broker,
                chat_id=args.id,
                request_id=args.request_id,
                reply_queue=args.reply_to or "",
                within=args.timeout,
                as_json=args.json,
            )
        finally:
            await broker.close()

    return asyncio.run(watch())


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def print_stream(
    settings: Settings,
    broker: Broker,
    *,
    chat_id: str,
    request_id: str,
    reply_queue: str,
    within: float,
    as_json: bool = False,
) -> int:
    """Print a request's text as it streams, then how it ended; 0 if it completed."""
    source: EventSource
    if settings.stream_redis_url:
        source = RedisEvents(settings.stream_redis_url, chat_id, request_id)
    else:
        source = QueueEvents(broker, reply_queue, request_id)
    assembled = await follow(source, within=within, on_text=_write, on_event=_show_tool_calls)
    reply = assembled.reply
    if reply is None:
        _write("\n")
        raise CliError(f"no reply within {within:g} s (the run may still finish)")
    content = reply.get("content")
    if isinstance(content, str) and content != assembled.text() and reply.get("deltaCount"):
        # Deltas are a preview; the reply is the truth (a delta was lost, say).
        _write(f"\n[the whole answer]\n{content}")
    elif not reply.get("deltaCount") and content:
        _write(content)  # the run did not stream (the assistants API)
    _write("\n")
    print(
        f"run {reply.get('runId')} {reply.get('status')}"
        + (f": {reply.get('error')}" if reply.get("error") else "")
        + f" ({assembled.held} of {reply.get('deltaCount')} deltas)",
        file=sys.stderr,
    )
    if as_json:
        print_json(reply)
    return 0 if reply.get("status") == "completed" else 1


def _show_tool_calls(event: dict[str, Any]) -> None:
    if event.get("type") == "toolCallsRequired":
        calls = ", ".join(f"{c.get('name')}({c.get('id')})" for c in event.get("toolCalls", []))
        print(f"\nrun {event.get('runId')} waits for tool outputs: {calls}", file=sys.stderr)
