"""``assistant-worker send``: put a request on the requests queue, as a producer would."""

import argparse
import asyncio
import uuid
from typing import Any

from pydantic import ValidationError

from schemas import AssistantCreate, AssistantDelete, encode_body
from schemas.decode import describe_errors
from worker.azure_clients import queue_service
from worker.azure_queue import AzureQueueBroker
from worker.cli.common import CliError, add_queue_flags, add_storage_flags, print_json
from worker.settings import Settings


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "send",
        help="enqueue a request (create, delete)",
        description="Put one request on the requests queue and print its message id and "
        "requestId. A requestId is generated when not given, so re-sending the same command "
        "with --request-id is harmless.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    create = kinds.add_parser(
        "create",
        help="create (or reset) an assistant",
        description="Send an assistantCreate request.",
    )
    create.add_argument("id", help="assistant (chat) id")
    create.add_argument("--instructions", help="system instructions (default: the extension's)")
    create.add_argument("--model", dest="chat_model", help="default model or deployment")
    create.add_argument(
        "--api", choices=["chat", "responses", "assistants"], help="default model API"
    )
    create.add_argument(
        "--tool",
        dest="tools",
        action="append",
        metavar="NAME",
        help="a registered tool to offer (repeat for several; default: all)",
    )
    create.add_argument("--temperature", type=float)
    create.add_argument("--max-tokens", type=int)

    delete = kinds.add_parser(
        "delete",
        help="delete an assistant and its chat",
        description="Send an assistantDelete request.",
    )
    delete.add_argument("id", help="assistant (chat) id")

    for sub in (create, delete):
        sub.add_argument("--request-id", help="idempotency key (default: a new UUID)")
        add_storage_flags(sub)
        add_queue_flags(sub)
        sub.set_defaults(handler=send_command)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request body for the parsed arguments, validated against its schema."""
    common = {
        "id": args.id,
        "requestId": args.request_id or str(uuid.uuid4()),
        "collectionName": args.collection,
        "chatStorageConnectionSetting": args.storage_setting,
    }
    fields: dict[str, Any] = {}
    model: type[AssistantCreate] | type[AssistantDelete]
    if args.kind == "create":
        model = AssistantCreate
        fields = {
            "instructions": args.instructions,
            "chatModel": args.chat_model,
            "api": args.api,
            "tools": args.tools,
            "temperature": args.temperature,
            "maxTokens": args.max_tokens,
        }
    else:
        model = AssistantDelete
    payload = {"type": model.model_fields["type"].default, **common}
    payload.update({key: value for key, value in fields.items() if value is not None})
    try:
        model.model_validate(payload)
    except ValidationError as error:
        raise CliError(f"invalid request: {describe_errors(error)}", exit_code=2) from None
    return payload


def send_command(args: argparse.Namespace, settings: Settings) -> int:
    payload = build_request(args)
    message_id = asyncio.run(send_payload(settings, payload))
    print_json(
        {
            "queue": settings.requests_queue,
            "messageId": message_id,
            "requestId": payload["requestId"],
            "request": payload,
        }
    )
    return 0


async def send_payload(settings: Settings, payload: dict[str, Any]) -> str:
    broker = AzureQueueBroker(queue_service(settings.default_storage))
    try:
        await broker.ensure_queues([settings.requests_queue])
        body = encode_body(payload, settings.message_encoding)
        return await broker.send(settings.requests_queue, body)
    finally:
        await broker.close()
