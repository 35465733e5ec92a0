"""``assistant-worker poison``: list, show, replay and purge dead letters (SPEC §6).

A poison queue is read by receiving with a lease, page by page (Azure's peek stops at 32
messages), and every message that was not deleted is released at the end, so reading leaves the
queue as it was. Whole queues are read (up to ``MAX_READ`` messages) and sorted oldest first,
so that ``--limit`` picks the same dead letters in every command. Replay puts the original
message back first and deletes the dead letter after: a duplicate is possible, a loss is not,
and the ``requestId`` makes the duplicate harmless.
Which messages are selected, and what replay puts back, is decided in ``worker.poison_ops``.
"""

import argparse
import asyncio
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

from schemas.names import check_queue_name
from worker.cli.common import CliError, add_queue_flags, print_json
from worker.poison_ops import (
    DeadLetterItem,
    Filters,
    describe_counts,
    parse_since,
    poison_queue_for,
    replay_body,
    select,
    table_lines,
)
from worker.poison_reader import (
    LEASE_SECONDS,
    MAX_READ,
    Leased,
    PoisonReader,
    ReadResult,
    lease_key,
    open_reader,
)
from worker.settings import Settings
from worker.transport import LeaseLost

LIST_EPILOG = """\
examples:
  assistant-worker poison list
  assistant-worker poison list --type assistantPost --since 2h
  assistant-worker poison list --error SettingNotAllowed --json | jq '.deadLetters[].messageId'
"""
SHOW_EPILOG = """\
example:
  assistant-worker poison show 7c9e6679-7425-40de-944b-e07fc1f90ae7
"""
REPLAY_EPILOG = """\
examples:
  assistant-worker poison replay 7c9e6679-7425-40de-944b-e07fc1f90ae7
  assistant-worker poison replay --error SettingNotAllowed --dry-run
  assistant-worker poison replay --all --rate 20
  assistant-worker poison replay --id chat-42 --to assistant-requests-staging
"""
PURGE_EPILOG = """\
examples:
  assistant-worker poison purge --type invalid --dry-run
  assistant-worker poison purge --type invalid --yes
  assistant-worker poison purge --all --queue assistant-runs --yes
"""
READING_NOTE = (
    f"Messages are read by leasing them for {LEASE_SECONDS} s (at most {MAX_READ} per command) "
    "and released afterwards: other readers of the poison queue do not see them meanwhile."
)


# --- arguments -------------------------------------------------------------------------------


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "poison",
        help="list, show, replay or purge dead letters",
        description=textwrap.fill(
            "Inspect and manage the dead-letter queues (<queue>-poison) of the requests and "
            "runs queues. Every action reads both poison queues unless --queue names one, and "
            "accepts the same filters (--type, --id, --error, --since, --limit).",
            width=79,
        ),
        epilog="examples:\n  assistant-worker poison list --since 1d\n"
        "  assistant-worker poison replay --error SettingNotAllowed --dry-run\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = _sub(
        actions,
        "list",
        help="list dead letters with their reasons",
        description="Print one line per dead letter: message id, queue, type, chat id, "
        "dead-lettered time, attempts and reason, then a count. " + READING_NOTE,
        epilog=LIST_EPILOG,
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help="print JSON ({total, matched, shown, deadLetters: [...]}) instead",
    )
    listing.set_defaults(handler=list_command)

    show = _sub(
        actions,
        "show",
        help="print one dead letter's whole envelope as JSON",
        description="Print the envelope of one dead letter (deadLetter details and the original "
        "message) as pretty JSON. " + READING_NOTE,
        epilog=SHOW_EPILOG,
    )
    show.add_argument(
        "message_id",
        metavar="MESSAGE_ID",
        help="the dead letter's message id (as `list` shows it) or the original message id",
    )
    show.set_defaults(handler=show_command)

    replay = _sub(
        actions,
        "replay",
        help="put dead letters back on their queue",
        description="Put each selected original message back on the queue it was dead-lettered "
        "from (or --to), then delete its dead letter. A JSON request without requestId gets the "
        "original message id as requestId, so a request that had in fact been applied is not "
        "applied twice; a raw-text message is put back unchanged. Select with message ids, "
        "--all, or filters. Messages that are not dead-letter envelopes are replayed only when "
        "named by id. " + READING_NOTE,
        epilog=REPLAY_EPILOG,
    )
    _add_selection(replay, "replay")
    replay.add_argument(
        "--to",
        metavar="QUEUE",
        help="queue to put the messages on (default: the queue each one was dead-lettered from)",
    )
    replay.add_argument(
        "--rate",
        type=_positive_float,
        metavar="N",
        help="at most N messages per second (default: as fast as possible)",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed and move nothing"
    )
    replay.set_defaults(handler=replay_command)

    purge = _sub(
        actions,
        "purge",
        help="delete dead letters",
        description="Delete the selected dead letters for good. Select with message ids, --all, "
        "or filters; nothing is deleted without --yes. " + READING_NOTE,
        epilog=PURGE_EPILOG,
    )
    _add_selection(purge, "purge")
    purge.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted and delete nothing"
    )
    purge.add_argument(
        "--yes",
        action="store_true",
        help="really delete (without it, purge only says how many it would delete)",
    )
    purge.set_defaults(handler=purge_command)


def _sub(
    actions: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    *,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    parser = actions.add_parser(
        name,
        help=help,
        # The raw formatter keeps the examples' layout; the description is wrapped here.
        description=textwrap.fill(description, width=79),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--queue",
        dest="poison_queues",
        action="append",
        metavar="NAME",
        help="the work queue (or its -poison queue) to read; repeat for several "
        "(default: the poison queues of the requests and runs queues)",
    )
    parser.add_argument(
        "--type",
        dest="message_type",
        metavar="TYPE",
        help="only this message type (assistantCreate, assistantPost, ...; "
        "'invalid' for bodies that were not a JSON object)",
    )
    parser.add_argument(
        "--id", dest="chat_id", metavar="CHAT_ID", help="only requests for this assistant (chat) id"
    )
    parser.add_argument(
        "--error",
        metavar="TEXT",
        help="only dead letters whose reason or error type contains TEXT (case-insensitive)",
    )
    parser.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="only dead letters dead-lettered at or after TIME: ISO-8601 (UTC "
        "when no zone is given) or an age such as 30m, 2h, 1d",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="at most N dead letters: the N oldest that match",
    )
    add_queue_flags(parser)
    return parser


def _add_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "message_ids",
        nargs="*",
        metavar="MESSAGE_ID",
        help=f"dead letters to {verb}, by message id or original message id",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help=f"{verb} every dead letter that matches the filters (all when none)",
    )


def _since(text: str) -> datetime:
    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def filters_from(args: argparse.Namespace) -> Filters:
    return Filters(
        message_type=args.message_type,
        chat_id=args.chat_id,
        error=args.error,
        since=args.since,
        ids=tuple(getattr(args, "message_ids", None) or ()),
    )


def poison_queues(args: argparse.Namespace, settings: Settings) -> tuple[list[str], bool]:
    """The poison queues to read, and whether they were named explicitly."""
    if not args.poison_queues:
        return [poison_queue_for(name) for name in settings.work_queues], False
    names: list[str] = []
    for given in args.poison_queues:
        name = poison_queue_for(given.strip())
        try:
            check_queue_name(name)
        except ValueError as error:
            raise CliError(f"--queue {given!r}: {error}", exit_code=2) from None
        if name not in names:
            names.append(name)
    return names, True


def _require_selection(args: argparse.Namespace, filters: Filters, verb: str) -> None:
    if args.all and filters.ids:
        raise CliError("give message ids or --all, not both", exit_code=2)
    if not (args.all or filters.ids or filters.has_criteria):
        raise CliError(
            f"nothing selected: give message ids, --all, or a filter (--type, --id, --error, "
            f"--since) to choose what to {verb}",
            exit_code=2,
        )


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _label(item: DeadLetterItem) -> str:
    parts = [item.message_type or "not a dead-letter envelope"]
    if item.chat_id:
        parts.append(f"chat {item.chat_id}")
    return ", ".join(parts)


# --- commands --------------------------------------------------------------------------------


def list_command(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_list(args, settings))


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    queues, explicit = poison_queues(args, settings)
    filters = filters_from(args)
    async with open_reader(settings) as reader:
        result = await reader.read(queues, explicit=explicit)
    items = result.items
    matched = select(items, filters)
    shown = matched[: args.limit] if args.limit is not None else matched
    if args.json:
        print_json(
            {
                "queues": queues,
                "total": len(items),
                "matched": len(matched),
                "shown": len(shown),
                "complete": not result.capped,
                "deadLetters": [item.summary() for item in shown],
            }
        )
    else:
        if shown:
            print("\n".join(table_lines(shown)))
        print(describe_counts(len(items), len(matched), len(shown), filters.has_criteria))
    if result.capped:
        _progress(f"stopped reading after {MAX_READ} messages: more may remain")
    return 0


def show_command(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_show(args, settings))


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    queues, explicit = poison_queues(args, settings)
    filters = replace(filters_from(args), ids=(args.message_id,))
    async with open_reader(settings) as reader:
        result = await reader.read(queues, explicit=explicit, wanted=filters.matches, need=1)
    found = select(result.items, filters, limit=1)
    if not found:
        raise CliError(f"no dead letter with message id {args.message_id!r} in {', '.join(queues)}")
    print_json(found[0].document())
    return 0


def replay_command(args: argparse.Namespace, settings: Settings) -> int:
    filters = filters_from(args)
    _require_selection(args, filters, "replay")
    if args.to is not None:
        try:
            check_queue_name(args.to)
        except ValueError as error:
            raise CliError(f"--to {args.to!r}: {error}", exit_code=2) from None
    return asyncio.run(_replay(args, settings, filters))


def _selected(
    result: ReadResult, filters: Filters, limit: int | None, *, envelopes_only: bool
) -> list[Leased]:
    chosen = select(result.items, filters, limit=limit, envelopes_only=envelopes_only)
    entries = {id(entry.item): entry for entry in result.leased}
    return [entries[id(item)] for item in chosen]


async def _replay(args: argparse.Namespace, settings: Settings, filters: Filters) -> int:
    queues, explicit = poison_queues(args, settings)

    async with open_reader(settings) as reader:
        result = await reader.read(queues, explicit=explicit)
        selected = _selected(result, filters, args.limit, envelopes_only=True)
        # The others go back at once: they need not stay hidden while the replay runs.
        chosen = {lease_key(entry) for entry in selected}
        await reader.release([entry for entry in result.leased if lease_key(entry) not in chosen])
        if result.capped:
            _progress(f"stopped reading after {MAX_READ} messages: more may remain")
        if not selected:
            print("no dead letters match: nothing replayed")
            return 0
        if args.dry_run:
            for entry in selected:
                target = args.to or entry.item.original_queue
                print(f"would replay {entry.item.message_id} ({_label(entry.item)}) to {target}")
            print(f"dry run: {len(selected)} dead letter(s) would be replayed; nothing was moved")
            return 0
        return await _move(reader, selected, args, settings)


async def _move(
    reader: PoisonReader,
    selected: list[Leased],
    args: argparse.Namespace,
    settings: Settings,
) -> int:
    """Put each message back, then delete its dead letter; paced by ``--rate``."""
    total = len(selected)
    replayed: Counter[str] = Counter()
    not_deleted: list[str] = []
    skipped: list[str] = []
    started = time.monotonic()
    for number, entry in enumerate(selected, start=1):
        item = entry.item
        target = args.to or item.original_queue
        try:
            check_queue_name(target)
        except ValueError as error:
            skipped.append(item.message_id)
            _progress(f"skipped {item.message_id}: its queue {target!r} {error}; use --to")
            continue
        if args.rate is not None:
            due = started + (number - 1) / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        try:
            entry = await reader.renewed(entry)
        except LeaseLost:
            skipped.append(item.message_id)
            _progress(f"skipped {item.message_id}: its lease was lost (someone else has it)")
            continue
        try:
            new_id = await reader.broker.send(target, replay_body(item, settings.message_encoding))
        except Exception as error:
            done = sum(replayed.values())
            raise CliError(
                f"could not put {item.message_id} on {target!r} ({type(error).__name__}: "
                f"{_first_line(error)}); replayed {done} of {total} before stopping, the rest "
                "are still dead letters"
            ) from None
        replayed[target] += 1
        try:
            await reader.delete(entry)
        except Exception as error:
            not_deleted.append(item.message_id)
            _progress(
                f"replayed {item.message_id} but could not delete its dead letter "
                f"({type(error).__name__}): it stays on {item.poison_queue}, a duplicate"
            )
        print(f"replayed {item.message_id} ({_label(item)}) to {target} as {new_id}")
        _progress(f"replayed {number}/{total}")
    done = sum(replayed.values())
    where = ", ".join(f"{count} to {queue}" for queue, count in sorted(replayed.items()))
    summary = f"replayed {done} of {total} dead letter(s)" + (f" ({where})" if where else "")
    if not_deleted:
        summary += f"; {len(not_deleted)} still on the poison queue: {', '.join(not_deleted)}"
    if skipped:
        summary += f"; {len(skipped)} skipped: {', '.join(skipped)}"
    print(summary)
    return 1 if not_deleted or skipped else 0


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def purge_command(args: argparse.Namespace, settings: Settings) -> int:
    filters = filters_from(args)
    _require_selection(args, filters, "purge")
    return asyncio.run(_purge(args, settings, filters))


async def _purge(args: argparse.Namespace, settings: Settings, filters: Filters) -> int:
    queues, explicit = poison_queues(args, settings)
    async with open_reader(settings) as reader:
        result = await reader.read(queues, explicit=explicit)
        selected = _selected(result, filters, args.limit, envelopes_only=False)
        chosen = {lease_key(entry) for entry in selected}
        await reader.release([entry for entry in result.leased if lease_key(entry) not in chosen])
        if result.capped:
            _progress(f"stopped reading after {MAX_READ} messages: more may remain")
        if not selected:
            print("no dead letters match: nothing to purge")
            return 0
        if args.dry_run:
            for entry in selected:
                item = entry.item
                print(f"would delete {item.message_id} ({_label(item)}) from {item.poison_queue}")
            print(f"dry run: {len(selected)} dead letter(s) would be deleted; nothing was deleted")
            return 0
        if not args.yes:
            raise CliError(
                f"purge would delete {len(selected)} dead letter(s) from {', '.join(queues)}; "
                "pass --yes to delete them (or --dry-run to see which)",
                exit_code=2,
            )
        deleted = 0
        lost: list[str] = []
        for number, entry in enumerate(selected, start=1):
            try:
                await reader.delete(entry)
            except LeaseLost:
                lost.append(entry.item.message_id)
                continue
            deleted += 1
            _progress(f"purged {number}/{len(selected)}")
        summary = f"purged {deleted} of {len(selected)} dead letter(s)"
        if lost:
            summary += f"; {len(lost)} were taken by someone else meanwhile: {', '.join(lost)}"
        print(summary)
        return 1 if lost else 0
