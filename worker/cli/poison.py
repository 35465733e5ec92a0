"""``assistant-worker poison``: list, show, replay and purge dead letters (SPEC §6).

This module defines the arguments; ``poison_commands`` carries them out.

A poison queue is read by receiving with a lease, page by page (Azure's peek stops at 32
messages), and every message that was not deleted is released at the end, so reading leaves the
queue as it was. Whole queues are read (up to ``MAX_READ`` messages) and sorted oldest first,
so that ``--limit`` picks the same dead letters in every command. Replay puts the original
message back first and deletes the dead letter after: a duplicate is possible, a loss is not,
and the ``requestId`` makes the duplicate harmless.
Which messages are selected, and what replay puts back, is decided in ``worker.deadletters.operations``.
"""

import argparse
import textwrap
from datetime import UTC, datetime

from worker.cli.common import add_queue_flags
from worker.cli.poison_commands import list_command, purge_command, replay_command, show_command
from worker.deadletters.operations import (
    parse_since,
)
from worker.deadletters.reader import (
    LEASE_SECONDS,
    MAX_READ,
)

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
            "Inspect and manage the dead-letter queues (<queue>-poison) of the requests, runs "
            "and deadlines queues (assistant-requests-poison, assistant-runs-poison, "
            "assistant-deadlines-poison by default). Every action reads the three unless "
            "--queue names one, and accepts the same filters (--type, --id, --error, --since, "
            "--limit).",
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
        "(default: the poison queues of the requests, runs and deadlines queues)",
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
