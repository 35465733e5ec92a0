"""What every subcommand shares: settings from flags, readable errors, JSON output."""

import argparse
import json
import sys
from typing import Any

from worker.config.settings import SPECS, Settings


class CliError(Exception):
    """An error to print as one line, with exit code 2 (usage) or 1 (failure)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


QUEUE_FIELDS = ("requests_queue", "runs_queue", "deadlines_queue", "message_encoding")


def add_queue_flags(
    parser: argparse.ArgumentParser, fields: tuple[str, ...] = QUEUE_FIELDS
) -> None:
    """The queue settings a command uses (``fields``: all of them by default), as flags."""
    for spec in SPECS:
        if spec.field in fields:
            parser.add_argument(
                spec.flag,
                dest=spec.field,
                default=None,
                metavar="VALUE",
                help=f"{spec.help} (env {spec.env}, default {spec.default!r})",
            )


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    """Which chat table a command reads or a request names."""
    parser.add_argument(
        "--collection",
        default="ChatState",
        help="table holding the chats (collectionName; default ChatState)",
    )
    parser.add_argument(
        "--storage-setting",
        default="AzureWebJobsStorage",
        help="setting holding the storage connection "
        "(chatStorageConnectionSetting; default AzureWebJobsStorage)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given winning."""
    overrides = {
        spec.field: str(getattr(args, spec.field))
        for spec in SPECS
        if getattr(args, spec.field, None) is not None
    }
    return Settings.from_env(overrides=overrides)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()
