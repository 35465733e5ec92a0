"""``assistant-worker state``: print a chat's ``AssistantState`` (the extension's query)."""

import argparse
import asyncio
from datetime import UTC, datetime

from pydantic import ValidationError

from handlers.query import get_state
from schemas import AssistantState, ChatRequest
from schemas.decode import describe_errors
from worker.cli.common import CliError, add_storage_flags, print_json
from worker.config.settings import Settings
from worker.store.stores import ChatStores


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "state",
        help="print a chat's AssistantState as JSON",
        description="Print the AssistantState of the extension's assistantQuery: id, exists, "
        "createdAt, lastUpdatedAt, totalMessages, totalTokens and recentMessages (with the "
        "decision on each call that needed approval), and the latest runs (with the calls an "
        "active run waits for: decisions, outputs).",
    )
    parser.add_argument("id", help="assistant (chat) id")
    parser.add_argument(
        "--since",
        type=parse_timestamp,
        metavar="TIMESTAMP",
        help="only messages created after this ISO-8601 time (UTC if no zone)",
    )
    add_storage_flags(parser)
    parser.set_defaults(handler=state_command)


def parse_timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time, e.g. 2026-01-31T12:00:00Z"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


async def read_state(
    settings: Settings, chat_id: str, table: str, setting: str, since: datetime | None
) -> AssistantState:
    """The library call behind the command (``get_state`` on a fresh store)."""
    stores = ChatStores(settings)
    try:
        store = await stores.get(setting, table)
        return await get_state(store, chat_id, since)
    finally:
        await stores.close()


def check_names(chat_id: str, table: str, setting: str) -> None:
    """The id, table and setting checked as a request's are, with ``send``'s message (a bad
    name would otherwise reach the service and come back as a storage error)."""
    names = {"id": chat_id, "collectionName": table, "chatStorageConnectionSetting": setting}
    try:
        ChatRequest.model_validate(names)
    except ValidationError as error:
        raise CliError(f"invalid request: {describe_errors(error)}", exit_code=2) from None


def state_command(args: argparse.Namespace, settings: Settings) -> int:
    check_names(args.id, args.collection, args.storage_setting)
    state = asyncio.run(
        read_state(settings, args.id, args.collection, args.storage_setting, args.since)
    )
    print_json(state.to_wire())
    return 0
