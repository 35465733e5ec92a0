"""Validation of the names a request carries: assistant ids, table, queue and setting names.

Each check returns the value or raises ``ValueError`` with a sentence a producer can act on;
pydantic turns that into the field's error.
"""

import re
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_ID_LENGTH = 256
MAX_REQUEST_ID_LENGTH = 200
# A base queue name leaves room for the "-poison" suffix within Azure's 63 characters.
MAX_BASE_QUEUE_NAME_LENGTH = 56

_FORBIDDEN_KEY_CHARS = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")
_QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]$")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,255}$")


def poison_queue_name(queue: str) -> str:
    """The dead-letter queue of a work queue (the Functions trigger's convention)."""
    return f"{queue}-poison"


def check_key(value: str) -> str:
    """A Table Storage key (assistant id): no ``/ \\ # ?`` and no control characters."""
    if _FORBIDDEN_KEY_CHARS.search(value):
        raise ValueError("must not contain '/', '\\', '#', '?' or control characters")
    return value


def check_table_name(value: str) -> str:
    """Azure table names: 3-63 letters and digits, starting with a letter, not 'tables'."""
    if not _TABLE_NAME.match(value) or value.lower() == "tables":
        raise ValueError(
            "must be a valid Azure table name: 3-63 letters or digits, starting with a letter"
        )
    return value


def check_queue_name(value: str) -> str:
    """Azure queue names: 3-63 lowercase letters, digits and single dashes."""
    if not _QUEUE_NAME.match(value):
        raise ValueError(
            "must be a valid Azure queue name: 3-63 lowercase letters, digits or single "
            "dashes, starting and ending with a letter or digit"
        )
    return value


def check_setting_name(value: str) -> str:
    """The name of an app setting (never its value)."""
    if not _SETTING_NAME.match(value):
        raise ValueError("must be the name of an app setting (letters, digits, '_', ':', '.')")
    return value


# The patterns are for the JSON Schema files; the validators give the readable message.
AssistantId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        json_schema_extra={"pattern": "^[^/\\\\#?\\u0000-\\u001f\\u007f-\\u009f]+$"},
    ),
    AfterValidator(check_key),
]
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_LENGTH)]
TableName = Annotated[
    str, Field(json_schema_extra={"pattern": _TABLE_NAME.pattern}), AfterValidator(check_table_name)
]
QueueName = Annotated[
    str, Field(json_schema_extra={"pattern": _QUEUE_NAME.pattern}), AfterValidator(check_queue_name)
]
SettingName = Annotated[str, AfterValidator(check_setting_name)]
