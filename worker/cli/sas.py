"""``assistant-worker sas``: a SAS token for the queue service, for producers without an SDK."""

import argparse
import shlex
from datetime import UTC, datetime

from worker.cli.common import CliError
from worker.config.redact import Redactor
from worker.config.settings import Settings

SAS_EPILOG = """\
example (the curl producer of docs/producers.md):
  eval "$(assistant-worker sas)"    # sets QUEUE_SERVICE_URL and QUEUE_SAS
  bash producer.sh
"""


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "sas",
        help="print a SAS token for the queue service (for the curl producer)",
        description="Print shell lines that set QUEUE_SERVICE_URL (the queue endpoint of "
        "AzureWebJobsStorage) and QUEUE_SAS (an account SAS for the queue service: resource "
        "types service, container and object; permissions read, add, create, process, "
        "delete), signed with the account key of the connection string (Azurite's included).",
        epilog=SAS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--hours", type=_hours, default=24.0, help="hours until the token expires (default 24)"
    )
    parser.set_defaults(handler=sas_command)


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 24 * 365:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours (up to a year)")
    return value


def sas_command(args: argparse.Namespace, settings: Settings) -> int:
    from worker.connections.sas import NoAccountKey, queue_account_sas

    try:
        sas = queue_account_sas(settings.default_storage, datetime.now(UTC), args.hours)
    except NoAccountKey as error:
        raise CliError(str(error)) from None
    except ValueError as error:
        # The SDK's own message may quote the connection string: mask its secrets.
        reason = Redactor(settings.secrets())(str(error))
        raise CliError(f"AzureWebJobsStorage is not a usable connection string: {reason}") from None
    print(f"export QUEUE_SERVICE_URL={shlex.quote(sas.service_url)}")
    print(f"export QUEUE_SAS={shlex.quote(sas.token)}")
    print(f"# valid until {sas.expiry.isoformat(timespec='seconds')}")
    return 0
