"""The ``poison`` commands: list, show, replay and purge (their arguments: ``poison.py``)."""

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import replace

from schemas.names import check_queue_name
from worker.cli.common import CliError, print_json
from worker.config.settings import Settings
from worker.deadletters.operations import (
    DeadLetterItem,
    Filters,
    describe_counts,
    poison_queue_for,
    replay_body,
    select,
    table_lines,
)
from worker.deadletters.reader import (
    MAX_READ,
    Leased,
    PoisonReader,
    ReadResult,
    lease_key,
    open_reader,
)
from worker.queues.transport import LeaseLost


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
