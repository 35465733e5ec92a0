"""``assistant-worker``: run the worker, send requests, query chats, manage dead letters.

A subcommand's module (and what it imports: the Azure SDKs, pydantic, the handlers) is loaded
only when that subcommand runs: ``run`` never imports the modules of ``poison``, ``chats``,
``send``, ``state`` or ``demo``, and ``--help``/``--version`` none of them until needed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker import __version__

if TYPE_CHECKING:
    from worker.config.settings import Settings

# Every subcommand and the module whose ``add_parser`` defines it, in the order of ``--help``.
COMMANDS = {
    "run": "worker.cli.run",
    "send": "worker.cli.send",
    "watch": "worker.cli.watch",
    "state": "worker.cli.state",
    "poison": "worker.cli.poison",
    "chats": "worker.cli.chats",
    "sas": "worker.cli.sas",
    "demo": "worker.cli.demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that subcommand (and only its module is
    imported). The two parse a command line naming ``only`` first alike."""
    parser = argparse.ArgumentParser(
        prog="assistant-worker",
        description="Run AI assistants behind Azure Storage queues. Settings come from the "
        "environment (AzureWebJobsStorage, OPENAI_API_KEY, WORKER_*; see docs/reference.md) and flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(commands)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand when the command line starts with one (the top level has no options
    but --help and --version, which need the whole parser); None otherwise."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (None: the process's own, ``sys.argv``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    # The process's own command line (the console script, ``python -m worker``): the objects
    # the imports create live as long as the process, so the cyclic GC is off while they load
    # and then leaves them alone (``gc.freeze``): nothing to scan in later collections, and no
    # final collections over them at exit (~0.1 s of a ``run --burst``). A caller's process
    # (``main([...])`` in tests) is left as it is.
    own_process = argv is None and gc.isenabled()
    if own_process:
        gc.disable()
    try:
        args = build_parser(_command_of(words)).parse_args(words)
    finally:
        if own_process:
            gc.freeze()
            gc.enable()
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from worker.cli.common import CliError, settings_from
    from worker.config.redact import Redactor
    from worker.config.settings import SettingsError
    from worker.loop.errors import PermanentError, TransientError
    from worker.queues.transport import QueueNotFound

    redact = Redactor()
    try:
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
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if _is_azure_error(error):
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"assistant-worker: storage error: {redact(first)}", file=sys.stderr)
            return 1
        if isinstance(error, TransientError):
            print(f"assistant-worker: error: {redact(error.reason)}", file=sys.stderr)
            return 1
        # The last net: one readable line, never a traceback.
        first = (str(error).strip().splitlines() or [""])[0]
        print(f"assistant-worker: error: {type(error).__name__}: {redact(first)}", file=sys.stderr)
        return 1


def _is_azure_error(error: Exception) -> bool:
    """An Azure SDK error; azure-core is not imported for it (if the SDK was never loaded,
    nothing raised one)."""
    exceptions = sys.modules.get("azure.core.exceptions")
    return exceptions is not None and isinstance(error, exceptions.AzureError)
