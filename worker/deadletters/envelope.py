"""The dead-letter envelope: the original body and why it was moved (pure).

``envelope_body`` never fails and always ends, whatever the body and the reason: a body that
cannot be re-encoded as JSON is kept as its raw text, and one too large to fit a queue message
beside its envelope keeps its beginning, with the reason saying so (a queue message holds at
most 64 KiB). The reason is capped first (``schemas.bounded``), and cut further as a last
resort, so that an envelope with an empty head always fits.
"""

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any

from schemas import DeadLetterEnvelope, DeadLetterInfo, InvalidMessage, decode_body, encode_body
from schemas.bounded import MAX_REASON_CHARS, cap
from schemas.decode import MAX_MESSAGE_BYTES, Encoding
from schemas.names import MAX_REQUEST_ID_LENGTH
from worker.config.redact import mask_values
from worker.queues.transport import Delivery


# The loop asks for a body's request id, then for its envelope: one decoding serves both (a
# 64 KiB body of thousands of keys takes a millisecond to read). Only read, never changed.
@functools.lru_cache(maxsize=2)
def original_message(body: str) -> Any:
    """The original body as JSON when it was a JSON object (plain or Base64), else raw text."""
    try:
        return decode_body(body, strict_text=False)
    except InvalidMessage:
        return body


def request_id_of(body: str) -> str | None:
    """The ``requestId`` of a body, if it has a valid one (for the envelope: one too long
    to be a request id is left to the original body)."""
    message = original_message(body)
    value = message.get("requestId") if isinstance(message, dict) else None
    return value if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_LENGTH else None


def build_envelope(
    delivery: Delivery,
    *,
    reason: str,
    error_type: str,
    request_id: str | None,
    now: datetime,
    message: Any = None,
) -> dict[str, Any]:
    """The JSON object that goes to ``<queue>-poison``."""
    info = DeadLetterInfo(
        reason=reason,
        error_type=error_type,
        queue=delivery.queue,
        message_id=delivery.message_id,
        dequeue_count=delivery.dequeue_count,
        inserted_on=delivery.inserted_on,
        dead_lettered_on=now,
        request_id=request_id,
    )
    original = original_message(delivery.body) if message is None else message
    # The original is JSON already (or text): put in after the dump, which would only walk
    # its thousands of keys again.
    envelope = DeadLetterEnvelope(dead_letter=info, message=None).model_dump(
        mode="json", by_alias=True
    )
    envelope["message"] = original
    return envelope


def envelope_body(
    delivery: Delivery,
    *,
    reason: str,
    error_type: str,
    request_id: str | None,
    now: datetime,
    encoding: Encoding,
    mask: Callable[[str], str] = lambda text: text,
) -> str:
    """The encoded envelope, always small enough for a queue message.

    ``mask`` is applied to every string of the envelope before it is encoded (the worker
    masks its own secrets, which a producer may have pasted into a request).
    """

    def encoded(reason_text: str, message: Any = None) -> str:
        envelope = build_envelope(
            delivery,
            reason=reason_text,
            error_type=error_type,
            request_id=request_id,
            now=now,
            message=message,
        )
        return encode_body(mask_values(envelope, mask), encoding)

    reason = cap(reason, MAX_REASON_CHARS)
    if request_id is not None:
        request_id = cap(request_id, MAX_REQUEST_ID_LENGTH)
    try:
        body = encoded(reason)
    except (ValueError, TypeError, RecursionError):
        # Nested too deeply to serialize again (JSON depth limits): keep the raw text.
        body = encoded(reason, delivery.body)
    if _fits(body):
        return body
    size = len(delivery.body)
    # Halving the head ends (an empty head); the reason is cut too when even that does not
    # fit (a reason of many characters that UTF-8 or Base64 make large).
    for limit in (MAX_REASON_CHARS, MAX_REASON_CHARS // 4, 100):
        note = (
            f"{cap(reason, limit)} [the original body, {size} characters, was too large to "
            "keep whole in a dead letter: message.head holds its beginning]"
        )
        head = delivery.body
        while head:
            head = head[: len(head) // 2]
            body = encoded(note, {"truncated": True, "originalLength": size, "head": head})
            if _fits(body):
                return body
    # Unreachable with the caps above (an empty head and a 100-character reason take a
    # few hundred bytes); kept so that the function ends whatever changes around it.
    return encoded(cap(reason, 100), {"truncated": True, "originalLength": size, "head": ""})


def _fits(body: str) -> bool:
    return len(body.encode("utf-8")) <= MAX_MESSAGE_BYTES
