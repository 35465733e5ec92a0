"""From a queue message body to a validated message, and back.

Bodies arrive as plain JSON (the JS SDK, most producers) or as Base64 of JSON (the Azure
Functions default, Storage Explorer, the older SDKs); the format is detected per message. Every
failure raises ``InvalidMessage`` with a reason a person can act on: it is a permanent error.
Whatever the body, decoding ends in a message or ``InvalidMessage`` (never another exception),
in time proportional to its size, with a reason of bounded length (``schemas.bounded``).
"""

import base64
import binascii
import json
import math
import re
import sys
from typing import Any, Literal

from pydantic import ValidationError

from schemas.bounded import MAX_QUOTE_CHARS, cap, quoted
from schemas.requests import MESSAGE_TYPES, Message

Encoding = Literal["none", "base64"]
_MAX_REASON_ERRORS = 5
# Bytes of one queue message, with room for the service's own framing.
MAX_MESSAGE_BYTES = 64 * 1024 - 1024
# Python refuses to read longer integers (CVE-2020-10735); 0 would mean no limit.
_MAX_DIGITS = sys.get_int_max_str_digits() or 4300


class InvalidMessage(ValueError):
    """A body that can never be processed, whatever the number of attempts."""

    def __init__(self, reason: str, *, message_type: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message_type = message_type


def decode_body(body: str | bytes, *, strict_text: bool = True) -> dict[str, Any]:
    """Parse a body that is a JSON object, or Base64 of one.

    ``strict_text=False`` lets strings that are not valid Unicode through (to keep a refused
    body in its dead letter as JSON)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    stripped = text.strip()
    if not stripped:
        raise InvalidMessage("the message body is empty; expected a JSON object")
    if stripped[0] in '{["' or stripped in ("null", "true", "false"):
        return _json_object(stripped, source="JSON", strict_text=strict_text)
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMessage(
            "the message body is neither JSON nor Base64-encoded JSON "
            f"(starts with {stripped[:20]!r})"
        ) from None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Short plain words ("oops", "test") are valid Base64 too: name both readings.
        raise InvalidMessage(
            "the message body is neither JSON nor Base64-encoded JSON "
            f"(starts with {stripped[:20]!r}; read as Base64 it is not UTF-8 text)"
        ) from None
    return _json_object(decoded.strip(), source="Base64-decoded JSON", strict_text=strict_text)


def _json_object(text: str, *, source: str, strict_text: bool = True) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except InvalidMessage:
        raise
    except json.JSONDecodeError as error:
        raise InvalidMessage(f"the message body is not valid {source}: {error}") from None
    except RecursionError:
        raise InvalidMessage(f"the message body is {source} nested too deeply to read") from None
    except ValueError as error:
        # An integer longer than Python reads (sys.get_int_max_str_digits()): a ValueError
        # that is not a JSONDecodeError. It is the body's fault: no retry can read it.
        found = re.search(r"has (\d+) digits", str(error))
        digits = f"of {found.group(1)} digits" if found else f"of more than {_MAX_DIGITS} digits"
        raise InvalidMessage(
            f"the message body holds an integer {digits}; at most {_MAX_DIGITS} digits can "
            "be read: send such a number as a string"
        ) from None
    if not isinstance(value, dict):
        kind = "array" if isinstance(value, list) else type(value).__name__
        raise InvalidMessage(f"the message body is a JSON {kind}; expected a JSON object")
    # JSON may escape half of a surrogate pair ("\ud83d", what a JavaScript producer sends
    # when it cuts a string inside an emoji): a valid Python str that no UTF-8 store or queue
    # accepts. Refused here, naming the field, so that it never reaches a write.
    if strict_text and "\\u" in text:
        field = _field_with_lone_surrogate(value)
        if field is not None:
            raise InvalidMessage(
                f"field '{cap(field, MAX_QUOTE_CHARS)}' is not valid Unicode text: it holds "
                "half of a surrogate pair "
                "(an escape such as \\ud83d without its partner, e.g. a string cut inside an "
                "emoji); send whole characters"
            )
    return value


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or an exponent, refused when a double cannot hold it
    (``1e999999`` reads as infinity, which JSON cannot write back)."""
    number = float(text)
    if not math.isfinite(number):
        raise InvalidMessage(
            f"the message body holds the number {cap(text, 40)}, too large for a JSON "
            "number (a 64-bit float); send a smaller number, or a string"
        )
    return number


def _no_constant(name: str) -> float:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python reads them, JSON has no such values."""
    raise InvalidMessage(
        f"the message body holds {name}, which is not JSON; send a number or null instead"
    )


def _field_with_lone_surrogate(value: Any) -> str | None:
    """The wire path of the first string (key or value) that UTF-8 cannot encode, or None.

    Depth first with a stack of its own: a body nested as deep as the JSON reader allows
    must not hit the recursion limit here."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return path or "body"
            continue
        children: list[tuple[Any, str]] = []
        if isinstance(item, dict):
            for key, child in item.items():
                if not _encodable(str(key)):
                    return path or "body"
                children.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list):
            children = [
                (child, f"{path}.{number}" if path else str(number))
                for number, child in enumerate(item)
            ]
        # Reversed: the first child is looked at first, as in document order.
        stack.extend(reversed(children))
    return None


def join_surrogates(text: str) -> str:
    """``text`` with every high-low surrogate pair joined into its character.

    A streamed model may send a character outside the BMP (an emoji) as a JSON-escaped
    surrogate pair split over two chunks (``"\ud83d"``, then ``"\ude00"``): each decodes to
    a lone surrogate, and their concatenation is two code points, not the character that the
    same text sent whole would be. Lone surrogates stay as they are."""
    if text.isascii() or _encodable(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_body(payload: dict[str, Any], encoding: Encoding = "none") -> str:
    """Serialize a message as the worker writes it (compact JSON, optionally Base64)."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if not _encodable(text):
        # A lone surrogate (it can only come from text the worker did not validate, such as a
        # dead letter's original body): ASCII escapes keep it as valid JSON, so the write
        # cannot fail on the content.
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
    if encoding == "base64":
        return base64.b64encode(text.encode("utf-8")).decode("ascii")
    return text


def unwrap_dead_letter(payload: dict[str, Any]) -> dict[str, Any]:
    """The original request inside a dead-letter envelope that was put back on a work queue.

    A request without a ``requestId`` keeps its identity: it gets the original message id, so
    that a request that had in fact been applied is recognised and not applied twice.
    """
    info = payload.get("deadLetter")
    message = payload.get("message")
    if not isinstance(info, dict) or "message" not in payload:
        return payload
    if not isinstance(message, dict):
        raise InvalidMessage(
            "a dead-letter envelope was put back on a work queue, but its message is not a JSON "
            "object: it can never be processed"
        )
    if "requestId" not in message and isinstance(info.get("messageId"), str):
        return {**message, "requestId": info["messageId"]}
    return message


def infer_type(payload: dict[str, Any]) -> str:
    """The message type; the extension's payloads carry none and are told apart by fields."""
    declared = payload.get("type")
    if declared is not None:
        if not isinstance(declared, str) or declared not in MESSAGE_TYPES:
            known = ", ".join(sorted(MESSAGE_TYPES))
            raise InvalidMessage(
                f"unknown message type {quoted(declared)}; expected one of: {known}"
            )
        return declared
    if "userMessage" in payload:
        return "assistantPost"
    if "toolOutputs" in payload:
        return "submitToolOutputs"
    if "approvals" in payload:
        # Not the extension's, but a decision sent without its type must never be read as a
        # create (which would reset the chat).
        return "submitToolApprovals"
    return "assistantCreate"


def parse_message(payload: dict[str, Any]) -> Message:
    """Validate a decoded body against the schema of its type."""
    payload = unwrap_dead_letter(payload)
    message_type = infer_type(payload)
    model = MESSAGE_TYPES[message_type]
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise InvalidMessage(
            f"invalid {message_type}: {describe_errors(error)}", message_type=message_type
        ) from None


def describe_errors(error: ValidationError) -> str:
    """A one-line summary of a validation error, naming each field with its wire name.

    Input values are left out: they can be long, and a producer may have put anything there;
    field paths (keys of free-form objects are the producer's) and messages are cut.
    """
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:_MAX_REASON_ERRORS]:
        location = cap(".".join(str(part) for part in item["loc"]), MAX_QUOTE_CHARS) or "body"
        if item["type"] == "missing":
            parts.append(f"field '{location}' is required")
        else:
            message = cap(item["msg"].removeprefix("Value error, "), 2 * MAX_QUOTE_CHARS)
            parts.append(f"field '{location}': {message}")
    extra = error.error_count() - _MAX_REASON_ERRORS
    if extra > 0:
        parts.append(f"and {extra} more")
    return "; ".join(parts)
