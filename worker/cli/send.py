"""``assistant-worker send``: put a request on the requests queue, as a producer would."""

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas import (
    AssistantCreate,
    AssistantDelete,
    AssistantPost,
    SubmitToolApprovals,
    SubmitToolOutputs,
    encode_body,
)
from schemas.decode import describe_errors
from worker.cli.common import CliError, add_queue_flags, add_storage_flags, print_json
from worker.cli.waiting import (
    CHECK_EVERY,
    Request,
    Watcher,
    dead_letter_line,
    quiet_for,
    remarks,
)
from worker.cli.watch import print_stream
from worker.client.replies import wait_for_reply
from worker.config.settings import Settings
from worker.connections.clients import queue_service
from worker.queues.azure import AzureQueueBroker

SEND_EPILOG = """\
examples:
  assistant-worker send create chat-1 --instructions "Be brief." --tool getWeatherAtLocation
  assistant-worker send post chat-1 "What's the weather in Seattle?" --wait
  assistant-worker send post chat-1 "Tell me a story" --wait --stream
  assistant-worker send tool-outputs chat-1 RUN_ID --output call_abc="70 degrees"
  assistant-worker send approve chat-1 RUN_ID call_abc --by ana@example.com
  assistant-worker send deny chat-1 RUN_ID call_abc --reason "not to customers" --by ana
  assistant-worker send delete chat-1
"""


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "send",
        help="enqueue a request (create, post, tool-outputs, approve, deny, delete)",
        description="Put one request on the requests queue and print its message id and "
        "requestId. A requestId is generated when not given; re-sending a command with the "
        "same --request-id is harmless.",
        epilog=SEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    create = kinds.add_parser(
        "create", help="create (or reset) an assistant", description="Send an assistantCreate."
    )
    create.add_argument("id", help="assistant (chat) id")
    create.add_argument("--instructions", help="system instructions (default: the extension's)")
    create.add_argument("--model", dest="chat_model", help="default model or deployment")
    create.add_argument("--api", choices=["chat", "responses", "assistants"],
                        help="model API (assistants is legacy: the Assistants API was sunset)")  # fmt: skip
    create.add_argument("--tool", dest="tools", action="append", metavar="NAME",
                        help="a registered tool to offer (repeat for several; default: all)")  # fmt: skip
    create.add_argument("--stream", action="store_true", default=None,
                        help="the assistant's runs stream their output (assistantDelta events)")  # fmt: skip
    create.add_argument("--temperature", type=float)
    create.add_argument("--max-tokens", type=int)

    post = kinds.add_parser(
        "post",
        help="post a user message (runs a turn)",
        description="Send an assistantPost. With --wait, the command waits for the run's "
        "assistantReply on a reply queue (a temporary one unless --reply-to is given), prints "
        "tool calls as they are announced and the answer, and exits 0 if the run completed. "
        "With --stream too, the run streams and the answer is printed as the model writes it "
        "(read from the reply queue, or from Redis when WORKER_STREAM_REDIS_URL is set).",
    )
    post.add_argument("id", help="assistant (chat) id")
    post.add_argument("message", help="the user message")
    post.add_argument("--model", dest="chat_model", help="model or deployment for this run")
    post.add_argument("--instructions", help="extra instructions for this run only")
    post.add_argument("--api", choices=["chat", "responses", "assistants"],
                      help="model API of this run only (e.g. moving a chat off the legacy "
                      "assistants; the history is the worker's)")  # fmt: skip
    post.add_argument("--reply-to", metavar="QUEUE", help="queue for the reply events")
    post.add_argument("--stream", action="store_true", default=None,
                      help="stream the run's output; with --wait, print it as it comes")  # fmt: skip
    post.add_argument("--wait", action="store_true", help="wait for the reply and print it")
    post.add_argument("--timeout", type=float, default=300.0,
                      help="seconds --wait waits (default 300)")  # fmt: skip

    outputs = kinds.add_parser(
        "tool-outputs",
        help="submit outputs of external tools",
        description="Send a submitToolOutputs for a run in requires_action.",
    )
    outputs.add_argument("id", help="assistant (chat) id")
    outputs.add_argument("run_id", help="the run waiting for outputs (from toolCallsRequired)")
    outputs.add_argument("--output", dest="outputs", action="append", default=[],
                         metavar="CALL_ID=TEXT", help="one tool call's output (repeat)")  # fmt: skip

    decisions = []
    for verdict, verb in (("approve", "approve"), ("deny", "deny")):
        decision = kinds.add_parser(
            verdict,
            help=f"{verb} a tool call that waits for approval",
            description=f"Send a submitToolApprovals that {verb}s one call of a run in "
            "requires_action (from toolApprovalRequired, or the waitingToolCalls of "
            "`assistant-worker state`). The first decision for a call stands.",
        )
        decision.add_argument("id", help="assistant (chat) id")
        decision.add_argument("run_id", help="the run waiting for the decision")
        decision.add_argument("call_id", help="the tool call to decide")
        decision.add_argument("--reason", help="why (a denied call's result says it)")
        decision.add_argument("--by", help="who decides (kept with the call, for audit)")
        decision.set_defaults(approve=verdict == "approve")
        decisions.append(decision)

    delete = kinds.add_parser(
        "delete", help="delete an assistant and its chat", description="Send an assistantDelete."
    )
    delete.add_argument("id", help="assistant (chat) id")

    for sub in (create, post, outputs, *decisions, delete):
        sub.add_argument("--request-id", help="idempotency key (default: a new UUID)")
        add_storage_flags(sub)
        # A producer's command: only the queue it sends to, and how it encodes.
        add_queue_flags(sub, ("requests_queue", "message_encoding"))
        sub.set_defaults(handler=send_command)


def _outputs(pairs: list[str]) -> list[dict[str, str]]:
    parsed = []
    for pair in pairs:
        call_id, sep, text = pair.partition("=")
        if not sep or not call_id:
            raise CliError(f"--output takes CALL_ID=TEXT, not {pair!r}", exit_code=2)
        parsed.append({"toolCallId": call_id, "output": text})
    if not parsed:
        raise CliError("give at least one --output CALL_ID=TEXT", exit_code=2)
    return parsed


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request body for the parsed arguments, validated against its schema."""
    payload: dict[str, Any] = {
        "id": args.id,
        "requestId": args.request_id or str(uuid.uuid4()),
        "collectionName": args.collection,
        "chatStorageConnectionSetting": args.storage_setting,
    }
    model: type[BaseModel]
    fields: dict[str, Any] = {}
    if args.kind == "create":
        model = AssistantCreate
        fields = {
            "instructions": args.instructions,
            "chatModel": args.chat_model,
            "api": args.api,
            "tools": args.tools,
            "stream": args.stream,
            "temperature": args.temperature,
            "maxTokens": args.max_tokens,
        }
    elif args.kind == "post":
        model = AssistantPost
        fields = {
            "userMessage": args.message,
            "chatModel": args.chat_model,
            "instructions": args.instructions,
            "replyTo": args.reply_to,
            "api": args.api,
            "stream": args.stream,
        }
    elif args.kind == "tool-outputs":
        model = SubmitToolOutputs
        fields = {"runId": args.run_id, "toolOutputs": _outputs(args.outputs)}
    elif args.kind in ("approve", "deny"):
        model = SubmitToolApprovals
        approval = {"toolCallId": args.call_id, "approve": args.approve,
                    "reason": args.reason, "by": args.by}  # fmt: skip
        approval = {key: value for key, value in approval.items() if value is not None}
        fields = {"runId": args.run_id, "approvals": [approval]}
    else:
        model = AssistantDelete
    payload = {"type": model.model_fields["type"].default, **payload}
    payload.update({key: value for key, value in fields.items() if value is not None})
    try:
        model.model_validate(payload)
    except ValidationError as error:
        raise CliError(f"invalid request: {describe_errors(error)}", exit_code=2) from None
    return payload


def send_command(args: argparse.Namespace, settings: Settings) -> int:
    wait = getattr(args, "wait", False)
    temporary = wait and not args.reply_to
    if temporary:
        args.reply_to = f"reply-{uuid.uuid4().hex[:16]}"
    payload = build_request(args)
    timeout = getattr(args, "timeout", 0.0)
    streamed = bool(getattr(args, "stream", None)) and wait
    return asyncio.run(
        _send(settings, payload, wait=wait, within=timeout, temporary=temporary, streamed=streamed)
    )


async def _send(
    settings: Settings,
    payload: dict[str, Any],
    *,
    wait: bool,
    within: float,
    temporary: bool,
    streamed: bool = False,
) -> int:
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    reply_queue = str(payload.get("replyTo") or "")
    try:
        # The reply queue is the producer's: the worker sends no event to a missing one.
        await broker.ensure_queues(
            [settings.requests_queue, *([reply_queue] if reply_queue else [])]
        )
        message_id = await broker.send(
            settings.requests_queue, encode_body(payload, settings.message_encoding)
        )
        sent = {"queue": settings.requests_queue, "messageId": message_id,
                "requestId": payload["requestId"], "request": payload}  # fmt: skip
        if not wait:
            print_json(sent)
            return 0
        say(f"sent {payload['type']} {message_id}; waiting for the reply on {reply_queue}")
        if streamed:
            return await print_stream(
                settings,
                broker,
                chat_id=str(payload["id"]),
                request_id=str(payload["requestId"]),
                reply_queue=reply_queue,
                within=within,
            )
        request = Request(
            chat_id=str(payload["id"]),
            table=str(payload["collectionName"]),
            storage_setting=str(payload["chatStorageConnectionSetting"]),
            message_id=message_id,
            queue=settings.requests_queue,
        )
        reply = await _wait(
            broker, settings, request, reply_queue, str(payload["requestId"]), within
        )
        print_json(reply)
        return 0 if reply.get("status") == "completed" else 1
    finally:
        if temporary:
            # Gone for good: a replay of this post later finds no queue to reply to, and the
            # worker drops its reply instead of making the queue again. Best effort (storage
            # may be what failed), and the clients are closed whatever happens.
            with contextlib.suppress(Exception):
                await broker.queue(reply_queue).client.delete_queue()
        await broker.close()


async def _wait(
    broker: AzureQueueBroker,
    settings: Settings,
    request: Request,
    reply_queue: str,
    request_id: str,
    within: float,
) -> dict[str, Any]:
    """The reply; meanwhile say what can be seen (see ``worker.cli.waiting``). A dead letter
    ends the wait at once, with its reason."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(
        wait_for_reply(
            broker, reply_queue, request_id=request_id, within=within, on_event=_show_event
        )
    )
    watcher = Watcher(broker, settings, request)
    quiet = quiet_for(settings.max_polling_interval)
    said: set[str] = set()
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=CHECK_EVERY)
            if waiting.done():
                break
            look = await watcher.look()
            if look.dead_letter is not None:
                raise CliError(dead_letter_line(look.dead_letter))
            elapsed = loop.time() - started
            for line in remarks(look, elapsed, said, request, quiet):
                say(line)
        reply = waiting.result()
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await waiting
        await watcher.close()
    if reply is None:
        raise CliError(f"no reply within {within:g} s (the run may still finish)")
    return reply


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _show_event(event: dict[str, Any]) -> None:
    kind = event.get("type")
    if kind in ("toolCallsRequired", "toolApprovalRequired"):
        calls = ", ".join(f"{c.get('name')}({c.get('id')})" for c in event.get("toolCalls", []))
        what = "tool outputs" if kind == "toolCallsRequired" else "approval"
        print(f"run {event.get('runId')} waits for {what}: {calls}", file=sys.stderr)
        print(json.dumps(event), file=sys.stderr)
