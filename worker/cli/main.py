"""``assistant-worker``: run the worker, send requests, query chats, manage dead letters."""

import argparse
import sys
from collections.abc import Sequence

from azure.core.exceptions import AzureError

from worker import __version__
from worker.cli import chats, demo, poison, run, send, state
from worker.cli.common import CliError
from worker.errors import PermanentError, TransientError
from worker.redact import Redactor
from worker.settings import Settings, SettingsError
from worker.transport import QueueNotFound


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="assistant-worker",
        description="Run AI assistants behind Azure Storage queues. Settings come from the "
        "environment (AzureWebJobsStorage, OPENAI_API_KEY, WORKER_*; see README) and flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(commands)
    send.add_parser(commands)
    state.add_parser(commands)
    poison.add_parser(commands)
    chats.add_parser(commands)
    demo.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    redact = Redactor()
    try:
        from worker.cli.common import settings_from

        if not getattr(args, "needs_settings", True):
            # The demo sets up its own storage and model before reading the settings.
            return int(args.handler(args, None))
        settings: Settings = settings_from(args)
        redact = Redactor(settings.secrets())
        return int(args.handler(args, settings))
    except (CliError, SettingsError, PermanentError) as error:
        print(f"assistant-worker: error: {redact(str(error))}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except QueueNotFound as error:
        print(f"assistant-worker: error: {error}", file=sys.stderr)
        return 1
    except AzureError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"assistant-worker: storage error: {redact(first)}", file=sys.stderr)
        return 1
    except TransientError as error:
        print(f"assistant-worker: error: {redact(error.reason)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the last net: one readable line, never a traceback
        first = (str(error).strip().splitlines() or [""])[0]
        print(f"assistant-worker: error: {type(error).__name__}: {redact(first)}", file=sys.stderr)
        return 1
