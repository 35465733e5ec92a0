"""The dead-letter envelope: the original body and why it was moved (pure)."""

import json
from datetime import datetime
from typing import Any

from schemas import DeadLetterEnvelope, DeadLetterInfo
from worker.transport import Delivery


def original_message(body: str) -> Any:
    """The original body as JSON when it was a JSON object (plain or Base64), else raw text."""
    from schemas import InvalidMessage, decode_body

    try:
        return decode_body(body)
    except InvalidMessage:
        return body


def build_envelope(
    delivery: Delivery,
    *,
    reason: str,
    error_type: str,
    request_id: str | None,
    now: datetime,
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
    envelope = DeadLetterEnvelope(dead_letter=info, message=original_message(delivery.body))
    return envelope.model_dump(mode="json", by_alias=True)


def request_id_of(body: str) -> str | None:
    """The ``requestId`` of a body, if it has a readable one (for the envelope)."""
    message = original_message(body)
    if isinstance(message, dict):
        value = message.get("requestId")
        if isinstance(value, str):
            return value
    return None


def parse_envelope(text: str) -> DeadLetterEnvelope | None:
    """A poison-queue body as an envelope, or None when it is not one."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = original_message(text)
    if not isinstance(payload, dict) or "deadLetter" not in payload:
        return None
    try:
        return DeadLetterEnvelope.model_validate(payload)
    except ValueError:
        return None
