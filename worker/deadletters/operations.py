"""Dead letters as the ``poison`` CLI sees them: parsing, filters and replay bodies (pure).

No I/O here: ``worker.cli.poison`` reads the poison queues and moves messages; this module
decides what each message is, whether it is selected, and what replaying it puts back.
"""

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas import DeadLetterEnvelope, InvalidMessage, decode_body, encode_body
from schemas.decode import Encoding
from schemas.names import poison_queue_name

# Re-exported: how `poison list` names the type of a dead letter's original message.
from worker.deadletters.identity import INVALID_TYPE as INVALID_TYPE
from worker.deadletters.identity import message_type_of as message_type_of

POISON_SUFFIX = "-poison"
NOT_AN_ENVELOPE = "not a dead-letter envelope"
# Envelopes put back on a work queue and dead-lettered again nest; unwrap at most this deep.
MAX_NESTING = 8

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def poison_queue_for(name: str) -> str:
    """The poison queue of ``name``: itself when it already is one."""
    return name if name.endswith(POISON_SUFFIX) else poison_queue_name(name)


def work_queue_of(poison_queue: str) -> str:
    """The work queue a poison queue belongs to (by the ``-poison`` convention)."""
    return poison_queue.removesuffix(POISON_SUFFIX)


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO-8601 time (UTC when no zone is given) or an age such as ``30m``, ``2h``, ``1d``.

    Raises ``ValueError`` with a readable message.
    """
    stripped = text.strip()
    relative = _RELATIVE.match(stripped.lower())
    if relative:
        amount, unit = relative.groups()
        return now - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        value = datetime.fromisoformat(stripped.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO-8601 time (e.g. 2026-01-31T12:00:00Z) nor an age "
            "(e.g. 30m, 2h, 1d)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _parse_envelope_payload(body: str) -> dict[str, Any] | None:
    """The JSON object of a poison-queue body (plain or Base64), or None."""
    try:
        payload = json.loads(body)
    except RecursionError:  # nested too deeply: nothing a dead-letter envelope looks like
        return None
    except json.JSONDecodeError:
        try:
            payload = decode_body(body)
        except (InvalidMessage, RecursionError):
            return None
    return payload if isinstance(payload, dict) else None


def _is_envelope(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("deadLetter"), dict) and "message" in value
    )


@dataclass(frozen=True)
class DeadLetterItem:
    """One message of a poison queue, with its envelope when it is one."""

    poison_queue: str
    message_id: str
    body: str
    payload: dict[str, Any] | None
    envelope: DeadLetterEnvelope | None
    inserted_on: datetime | None = None

    @classmethod
    def parse(
        cls, poison_queue: str, message_id: str, body: str, inserted_on: datetime | None = None
    ) -> "DeadLetterItem":
        payload = _parse_envelope_payload(body)
        envelope: DeadLetterEnvelope | None = None
        if payload is not None and _is_envelope(payload):
            try:
                envelope = DeadLetterEnvelope.model_validate(payload)
            except ValueError:
                envelope = None
        return cls(poison_queue, message_id, body, payload, envelope, inserted_on)

    @property
    def is_envelope(self) -> bool:
        return self.envelope is not None

    @property
    def original(self) -> Any:
        """The original message, unwrapped from nested envelopes (None if not an envelope)."""
        if self.envelope is None:
            return None
        message = self.envelope.message
        for _ in range(MAX_NESTING):
            if not _is_envelope(message):
                break
            message = message["message"]
        return message

    @property
    def original_message_id(self) -> str | None:
        return self.envelope.dead_letter.message_id if self.envelope else None

    @property
    def original_queue(self) -> str:
        """The queue the message was dead-lettered from (or, for a foreign body, by name)."""
        if self.envelope is not None:
            return self.envelope.dead_letter.queue
        return work_queue_of(self.poison_queue)

    @property
    def message_type(self) -> str | None:
        """The request type; ``invalid`` when the original body was not a JSON object."""
        if self.envelope is None:
            return None
        return message_type_of(self.original)

    @property
    def chat_id(self) -> str | None:
        original = self.original
        if isinstance(original, dict) and isinstance(original.get("id"), str):
            return str(original["id"])
        return None

    @property
    def reason(self) -> str:
        return self.envelope.dead_letter.reason if self.envelope else NOT_AN_ENVELOPE

    @property
    def error_type(self) -> str | None:
        return self.envelope.dead_letter.error_type if self.envelope else None

    @property
    def dead_lettered_on(self) -> datetime | None:
        return self.envelope.dead_letter.dead_lettered_on if self.envelope else None

    @property
    def dequeue_count(self) -> int | None:
        return self.envelope.dead_letter.dequeue_count if self.envelope else None

    def has_id(self, message_id: str) -> bool:
        """Named by its poison-queue message id or by the original message id."""
        return message_id in (self.message_id, self.original_message_id)

    def summary(self) -> dict[str, Any]:
        """One dead letter for ``list --json``."""
        info = self.envelope.dead_letter if self.envelope else None
        return {
            "messageId": self.message_id,
            "poisonQueue": self.poison_queue,
            "queue": self.original_queue,
            "isEnvelope": self.is_envelope,
            "type": self.message_type,
            "chatId": self.chat_id,
            "deadLetteredOn": _iso(self.dead_lettered_on),
            "dequeueCount": self.dequeue_count,
            "reason": self.reason,
            "errorType": self.error_type,
            "originalMessageId": self.original_message_id,
            "requestId": info.request_id if info else None,
            "insertedOn": _iso(self.inserted_on),
        }

    def document(self) -> Any:
        """What ``show`` prints: the envelope as stored, or the raw body of a foreign message."""
        if self.envelope is not None and self.payload is not None:
            return self.payload
        return {
            "messageId": self.message_id,
            "poisonQueue": self.poison_queue,
            "note": NOT_AN_ENVELOPE,
            "body": self.body,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class Filters:
    """What ``--type``, ``--id``, ``--error``, ``--since`` and message ids select."""

    message_type: str | None = None
    chat_id: str | None = None
    error: str | None = None
    since: datetime | None = None
    ids: tuple[str, ...] = ()

    @property
    def has_criteria(self) -> bool:
        """True when a filter option (not only ids) narrows the selection."""
        return any(v is not None for v in (self.message_type, self.chat_id, self.error, self.since))

    def matches(self, item: DeadLetterItem, *, envelopes_only: bool = False) -> bool:
        """Every given criterion holds.

        A message that is not an envelope has no type, chat, reason or time: it matches when
        named by id, or, when ``envelopes_only`` is False, when no criterion is given.
        """
        if self.ids and not any(item.has_id(message_id) for message_id in self.ids):
            return False
        if item.envelope is None:
            # Nothing to filter on: only "everything" or its id selects it.
            if self.has_criteria:
                return False
            return bool(self.ids) or not envelopes_only
        if self.message_type is not None and (
            (item.message_type or "").lower() != self.message_type.lower()
        ):
            return False
        if self.chat_id is not None and item.chat_id != self.chat_id:
            return False
        if self.error is not None:
            needle = self.error.lower()
            if needle not in item.reason.lower() and needle not in (item.error_type or "").lower():
                return False
        if self.since is not None:
            when = item.dead_lettered_on
            if when is None or _aware(when) < _aware(self.since):
                return False
        return True


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


_LAST = datetime.max.replace(tzinfo=UTC)


def ordered(items: Iterable[DeadLetterItem]) -> list[DeadLetterItem]:
    """Oldest dead letter first (foreign messages by their insertion time), then by id.

    Queue order is not stable (releasing a message moves it), so every command sorts: the
    same ``--limit`` selects the same dead letters in ``list`` and in ``replay``.
    """

    def key(item: DeadLetterItem) -> tuple[datetime, str, str]:
        when = item.dead_lettered_on or item.inserted_on
        return (_aware(when) if when else _LAST, item.poison_queue, item.message_id)

    return sorted(items, key=key)


def select(
    items: Iterable[DeadLetterItem],
    filters: Filters,
    *,
    limit: int | None = None,
    envelopes_only: bool = False,
) -> list[DeadLetterItem]:
    """The items that match, in the given order, at most ``limit``."""
    chosen: list[DeadLetterItem] = []
    for item in items:
        if limit is not None and len(chosen) >= limit:
            break
        if filters.matches(item, envelopes_only=envelopes_only):
            chosen.append(item)
    return chosen


def replay_message(item: DeadLetterItem) -> dict[str, Any] | str:
    """What replay puts back: the original JSON object, keeping its identity, or raw text.

    A JSON object without ``requestId`` gets the original queue message id, the request id the
    worker used for it, so a request that had in fact been applied is recognised.
    """
    if item.envelope is None:
        return item.body
    message: Any = item.envelope.message
    message_id = item.envelope.dead_letter.message_id
    for _ in range(MAX_NESTING):
        if not _is_envelope(message):
            break
        inner = message["deadLetter"].get("messageId")
        message_id = inner if isinstance(inner, str) else message_id
        message = message["message"]
    if isinstance(message, dict):
        if "requestId" not in message:
            return {**message, "requestId": message_id}
        return dict(message)
    if isinstance(message, str):
        return message
    return json.dumps(message, ensure_ascii=False)


def replay_body(item: DeadLetterItem, encoding: Encoding) -> str:
    """The queue message text of a replay: JSON in ``encoding``, raw text unchanged."""
    message = replay_message(item)
    if isinstance(message, dict):
        return encode_body(message, encoding)
    return message


def describe_counts(total: int, matched: int, shown: int, filtered: bool) -> str:
    """``3 dead letters (2 shown)``, naming the matches when filters were given."""
    noun = "dead letter" if total == 1 else "dead letters"
    if filtered and matched != total:
        return f"{total} {noun}, {matched} matching ({shown} shown)"
    return f"{total} {noun} ({shown} shown)"


def table_lines(items: Sequence[DeadLetterItem]) -> list[str]:
    """The ``list`` table: a header and one aligned line per dead letter."""
    header = ("MESSAGE ID", "QUEUE", "TYPE", "CHAT", "DEAD-LETTERED", "ATTEMPTS", "REASON")
    rows = [header]
    for item in items:
        when = item.dead_lettered_on
        rows.append(
            (
                item.message_id,
                item.original_queue,
                item.message_type or "-",
                item.chat_id or "-",
                when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else "-",
                str(item.dequeue_count) if item.dequeue_count is not None else "-",
                " ".join(item.reason.split()),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return [
        "  ".join(value.ljust(width) for value, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    ]
