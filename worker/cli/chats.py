"""``assistant-worker chats list|purge``: chats by last activity, and the retention policy.

``purge --older-than 30d`` deletes every chat idle for longer than that, whole (messages, runs,
applied-request records, tool results and the state row). Nothing is deleted without
``--yes``; ``--dry-run`` lists what would go. Requests are paced by ``--rate``.
"""

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from schemas.names import check_table_name
from schemas.requests import DEFAULT_STORAGE_SETTING
from worker.cli.common import CliError
from worker.config.settings import Settings
from worker.store.retention import (
    ChatSummary,
    Pacer,
    TableClient,
    TableNotFound,
    list_chats,
    open_table,
    purge_chat,
)

DEFAULT_RATE = 20.0
DEFAULT_LIMIT = 50
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")

EPILOG = """examples:
  assistant-worker chats list --limit 20
  assistant-worker chats purge --older-than 30d --dry-run
  assistant-worker chats purge --older-than 30d --yes --rate 10
"""


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or combinations (``1d12h``)."""
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number and a unit (s, m, h, d, w), e.g. 30d, "
            "12h or 90m"
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be more than zero")
    return timedelta(seconds=seconds)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of requests per second")
    return value


def _table(text: str) -> str:
    try:
        return check_table_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"table {text!r} {error}") from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--table",
        "--collection",
        dest="table",
        type=_table,
        default="ChatState",
        help="table holding the chats (collectionName; default ChatState)",
    )
    parser.add_argument(
        "--storage-setting",
        default=DEFAULT_STORAGE_SETTING,
        help="setting holding the storage connection (default AzureWebJobsStorage; others "
        "must be listed in WORKER_STORAGE_SETTINGS)",
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        default=DEFAULT_RATE,
        metavar="N",
        help=f"at most N storage requests per second (default {DEFAULT_RATE:g}; 0: no bound)",
    )


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "chats",
        help="list chats by last activity; purge idle ones",
        description="List the chats of a table by last activity, and delete the ones idle "
        "for longer than a retention period.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="chats_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="chats by last activity, newest first",
        description="Print the chats of the table (id, createdAt, lastUpdatedAt, "
        "totalMessages), newest activity first. Reads every state row of the table.",
    )
    _add_common(listing)
    listing.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LIMIT,
        help=f"print at most this many chats (default {DEFAULT_LIMIT})",
    )
    listing.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many chats first (the next page: --offset 50)",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=list_command)

    purge = actions.add_parser(
        "purge",
        help="delete chats idle for longer than --older-than",
        description="Delete, whole, every chat whose last activity (lastUpdatedAt) is older "
        "than --older-than: its messages, runs, applied-request records, tool results and "
        "state row. A chat with an active run is kept unless --include-active. A chat that "
        "changes during the purge is left alone. Nothing is deleted without --yes.",
    )
    _add_common(purge)
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="DURATION",
        help="idle time, e.g. 30d, 12h, 90m",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted and delete nothing"
    )
    purge.add_argument(
        "--yes",
        action="store_true",
        help="really delete (without it, purge only says how many it would delete)",
    )
    purge.add_argument(
        "--include-active",
        action="store_true",
        help="also purge idle chats whose run is still active (a run stuck for that long)",
    )
    purge.set_defaults(handler=purge_command)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@asynccontextmanager
async def _table_client(settings: Settings, setting: str, table: str) -> AsyncIterator[TableClient]:
    """The table's client; the table is never created (a missing one is an error)."""
    connection = settings.storage.get(setting)
    if connection is None:
        raise CliError(
            f"storage setting {setting!r} is not configured: use {DEFAULT_STORAGE_SETTING} or "
            "a name listed in WORKER_STORAGE_SETTINGS",
            exit_code=2,
        )
    async with open_table(connection, table) as client:
        yield client


async def _listed(client: TableClient, table: str, setting: str, pacer: Pacer) -> list[ChatSummary]:
    try:
        return await list_chats(client, pacer)
    except TableNotFound:
        raise CliError(f"table {table!r} of storage setting {setting!r} does not exist") from None


def _line(chat: ChatSummary) -> str:
    active = f"  (active run {chat.active_run_id})" if chat.active_run_id else ""
    return (
        f"{chat.last_updated_at:%Y-%m-%dT%H:%M:%SZ}  {chat.created_at:%Y-%m-%dT%H:%M:%SZ}  "
        f"{chat.total_messages:>8}  {chat.chat_id}{active}"
    )


def list_command(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_list(args, settings))


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    async with _table_client(settings, args.storage_setting, args.table) as client:
        chats = await _listed(client, args.table, args.storage_setting, Pacer(args.rate or None))
    offset = max(args.offset, 0)
    page = chats[offset : offset + args.limit]
    if args.json:
        json.dump([chat.to_json() for chat in page], sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(f"{'lastUpdatedAt':<20}  {'createdAt':<20}  {'messages':>8}  id")
        for chat in page:
            print(_line(chat))
    rest = len(chats) - offset - len(page)
    if rest > 0:
        _progress(
            f"{len(chats)} chats in {args.table}; {rest} more after these "
            f"(--offset {offset + len(page)})"
        )
    return 0


def purge_command(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_purge(args, settings, datetime.now(UTC)))


async def _purge(args: argparse.Namespace, settings: Settings, now: datetime) -> int:
    cutoff = now - args.older_than
    pacer = Pacer(args.rate or None)
    async with _table_client(settings, args.storage_setting, args.table) as client:
        chats = await _listed(client, args.table, args.storage_setting, pacer)
        idle = [chat for chat in chats if chat.last_updated_at < cutoff]
        active = [chat for chat in idle if chat.active_run_id and not args.include_active]
        kept = {chat.chat_id for chat in active}
        selected = [chat for chat in idle if chat.chat_id not in kept]
        for chat in active:
            _progress(f"skipped {chat.chat_id}: its run {chat.active_run_id} is still active")
        when = f"{cutoff:%Y-%m-%dT%H:%M:%SZ}"
        if not selected:
            print(f"no chats idle since before {when} to purge" + _skipped(active))
            return 0
        if args.dry_run:
            for chat in selected:
                print(f"would purge {chat.chat_id} (last activity {chat.last_updated_at:%Y-%m-%dT%H:%M:%SZ}, {chat.total_messages} messages)")  # fmt: skip
            print(
                f"dry run: {len(selected)} chat(s) idle since before {when} would be purged; "
                "nothing was deleted" + _skipped(active)
            )
            return 0
        if not args.yes:
            raise CliError(
                f"purge would delete {len(selected)} chat(s) of {args.table} idle since before "
                f"{when}; pass --yes to delete them (or --dry-run to see which)",
                exit_code=2,
            )
        purged = rows = 0
        changed: list[str] = []
        for number, chat in enumerate(selected, start=1):
            result = await purge_chat(client, chat, pacer)
            rows += result.rows
            if result.status == "purged":
                purged += 1
                print(f"purged {chat.chat_id} ({result.rows} rows)")
            else:
                changed.append(chat.chat_id)
                what = "changed" if result.status == "changed" else "was created again"
                _progress(f"left {chat.chat_id} alone: it {what} during the purge")
            _progress(f"purge {number}/{len(selected)}")
    summary = f"purged {purged} of {len(selected)} idle chat(s) ({rows} rows)"
    if changed:
        summary += f"; {len(changed)} changed meanwhile and kept: {', '.join(changed)}"
    print(summary + _skipped(active))
    return 0


def _skipped(active: list[ChatSummary]) -> str:
    if not active:
        return ""
    return f"; {len(active)} skipped with an active run (--include-active to purge them too)"
