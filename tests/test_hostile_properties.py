"""Hostile input, property-tested (Hypothesis): whatever a body holds, up to a queue message's
64 KiB, plain or Base64, decoding and validation end in a message or ``InvalidMessage`` (never
another exception) within a time bound, with a bounded reason; every dead-letter envelope fits
a queue message and reads back as JSON.

The examples are bounded and derandomized (the ``assistant-worker`` profile in
``tests/conftest.py``), so the suites take seconds in ``make test``; ``HYPOTHESIS_PROFILE=soak``
runs many more.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from schemas import InvalidMessage, decode_body, parse_message
from schemas.bounded import MAX_REASON_CHARS, cap, listing
from schemas.decode import MAX_MESSAGE_BYTES
from schemas.requests import MESSAGE_TYPES, Message
from worker.deadletters.envelope import envelope_body, request_id_of
from worker.loop.errors import PermanentError, describe
from worker.loop.outcome import DeadLetter, RetryPolicy, decide
from worker.queues.transport import Delivery

# Bytes of UTF-8 a queue message holds.
QUEUE_MESSAGE_BYTES = 64 * 1024
# Seconds one body may take through decode, validation or the envelope. Milliseconds in
# practice; generous so that a busy CI machine does not fail it, while a loop that does not
# end (or work that grows with the square of the size) still does.
TIME_BOUND = 1.0
# Seconds after which a call is interrupted (SIGALRM): it would not end.
HANG_BOUND = 10.0
NOW = datetime(2026, 1, 1, tzinfo=UTC)

# --- strategies ---------------------------------------------------------------------------------

# Text with what breaks naive code: emoji (4 UTF-8 bytes, 2 UTF-16 units), NUL and control
# characters, quotes and backslashes, lone surrogates (invalid in UTF-8).
awkward_chars = st.sampled_from(
    ["\U0001f600", "\x00", "\x1f", '"', "\\", "\ud83d", "é", "\u2028", "{", "[", "9", "e"]
)
small_text = st.text(st.one_of(st.characters(), awkward_chars), max_size=40)


@st.composite
def long_text(draw: st.DrawFn, max_chars: int = 16_000) -> str:
    """A string of up to ``max_chars`` characters: a short piece repeated (Hypothesis draws
    a few bytes, not 64 KiB, per example)."""
    piece = draw(small_text.filter(bool))
    return (piece * (max_chars // len(piece) + 1))[: draw(st.integers(0, max_chars))]


numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(0, 60_000).map(lambda digits: int("9" * max(digits // 20, 1))),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | small_text | long_text(2_000),
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(small_text, children, max_size=8)
    ),
    max_leaves=40,
)
names = st.one_of(
    small_text, long_text(400), long_text(16_000), st.sampled_from(["chat", "ok", "ChatState"])
)
request_fields = {
    "type": st.one_of(st.sampled_from(sorted(MESSAGE_TYPES)), names, json_values),
    "id": st.one_of(names, json_values),
    "requestId": st.one_of(names, json_values),
    "collectionName": names,
    "chatStorageConnectionSetting": names,
    "instructions": long_text(),
    "userMessage": long_text(),
    "chatModel": names,
    "api": st.sampled_from(["chat", "responses", "assistants", "nope"]),
    "tools": st.one_of(
        st.lists(names, max_size=50),
        st.integers(0, 16_000).map(lambda n: [f"t{i}" for i in range(n)]),
        json_values,
    ),
    "temperature": st.one_of(numbers, json_values),
    "maxTokens": numbers,
    "toolOutputs": json_values,
    "runId": names,
    "step": numbers,
    "replyTo": names,
    "traceparent": names,
}
requests = st.fixed_dictionaries({}, optional=request_fields)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _lone_surrogate_safe(text: str) -> str:
    # A body must be UTF-8 text to travel; lone surrogates go as JSON escapes.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@st.composite
def hostile_templates(draw: st.DrawFn) -> str:
    """Bodies built to hurt: deep nesting, numbers JSON cannot hold, thousands of names."""
    depth = draw(st.integers(1, 30_000))
    digits = draw(st.integers(1, 20_000))
    request = draw(requests)
    prefix = _json(request)[:-1] + ("," if request else "")
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return "[" * depth + "]" * depth
    if choice == 1:
        return '{"a":' * (depth // 5) + "1" + "}" * (depth // 5)
    if choice == 2:
        return prefix + '"maxTokens":' + "9" * digits + "}"
    if choice == 3:
        return prefix + f'"temperature":1e{digits}}}'
    if choice == 4:
        return prefix + f'"seed":{draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))}}}'
    if choice == 5:
        count = draw(st.integers(0, 12_000))
        return _json({"type": "assistantCreate", "id": "x", "tools": ["ab"] * count})
    if choice == 6:
        return prefix + '"id":"' + "\\ud83d" * (digits // 6 + 1) + '"}'
    return "[" * depth + "{" * depth


bodies_text = st.one_of(
    st.text(max_size=200),
    long_text(60_000),
    json_values.map(_json),
    requests.map(_json),
    hostile_templates(),
).map(_lone_surrogate_safe)


@st.composite
def bodies(draw: st.DrawFn) -> str:
    """A queue message body: any of the above, plain or Base64 (or random bytes in Base64),
    at most 64 KiB of UTF-8."""
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=200))
        body = base64.b64encode(raw * draw(st.integers(1, 200))).decode("ascii")
    else:
        text = draw(bodies_text)
        base64_it = draw(st.booleans())
        body = base64.b64encode(text.encode("utf-8")).decode("ascii") if base64_it else text
    # What does not fit a queue message never reaches a worker.
    encoded = body.encode("utf-8")[:QUEUE_MESSAGE_BYTES]
    return encoded.decode("utf-8", "ignore")


def _delivery(body: str) -> Delivery:
    return Delivery(
        queue="assistant-requests",
        message_id="0f3c2a5e-1111-4222-8333-944455556666",
        pop_receipt="receipt",
        dequeue_count=1,
        body=body,
        inserted_on=NOW,
    )


def _mask(text: str) -> str:
    """The worker masks its own secrets in dead letters (here: one made-up value)."""
    return text.replace("s3cr3t-value", "***")


class TookTooLong(BaseException):
    """Raised into a call that runs past its bound (a loop that does not end is a failing
    example, not a hung suite). A BaseException: the call under test cannot swallow it."""


def _interrupt(_signum: int, _frame: Any) -> None:
    raise TookTooLong(f"still running after {HANG_BOUND} s")


def _timed(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, BaseException | None]:
    """``call``'s value or its exception, failing the example when it took too long (and
    interrupting it when it does not end)."""
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, HANG_BOUND)
    started = time.perf_counter()
    try:
        value, error = call(*args, **kwargs), None
    except Exception as failure:
        value, error = None, failure
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    took = time.perf_counter() - started
    assert took < TIME_BOUND, f"{getattr(call, '__name__', call)} took {took:.2f} s"
    return value, error


def _check_refusal(error: BaseException | None) -> None:
    """Nothing but ``InvalidMessage`` (a permanent error), with a reason of bounded length."""
    if error is None:
        return
    assert isinstance(error, InvalidMessage), f"{type(error).__name__}: {cap(str(error), 300)}"
    assert error.reason and len(error.reason) <= MAX_REASON_CHARS, len(error.reason)
    outcome = decide(error, 1, RetryPolicy())
    assert isinstance(outcome, DeadLetter), "a refused body is dead-lettered at once"


# --- properties ---------------------------------------------------------------------------------


@given(bodies())
def test_decoding_any_body_ends_in_an_object_or_a_permanent_error(body: str) -> None:
    value, error = _timed(decode_body, body)
    _check_refusal(error)
    if error is None:
        assert isinstance(value, dict)
        # What decodes can be written again (no infinity, no NaN, no half surrogates).
        json.dumps(value, allow_nan=False).encode("utf-8")


@given(bodies())
def test_decoding_and_validating_any_body_ends_in_a_message_or_a_permanent_error(
    body: str,
) -> None:
    value, error = _timed(lambda: parse_message(decode_body(body)))
    _check_refusal(error)
    if error is None:
        assert isinstance(value, Message)


@given(st.one_of(requests, st.dictionaries(small_text, json_values, max_size=20)))
def test_validating_any_object_ends_in_a_message_or_a_permanent_error(
    payload: dict[str, Any],
) -> None:
    value, error = _timed(parse_message, payload)
    _check_refusal(error)
    if error is None:
        assert isinstance(value, Message)


@given(
    bodies(),
    st.one_of(small_text, long_text(100_000)),
    st.one_of(st.none(), names),
    st.sampled_from(["none", "base64"]),
)
def test_every_envelope_fits_a_queue_message(
    body: str, reason: str, request_id: str | None, encoding: str
) -> None:
    """Whatever the body, the reason (up to 100,000 characters, emoji included) and the
    request id, the envelope is built in bounded time, fits a queue message and reads back
    as a JSON dead letter that starts with the reason."""
    reason = _lone_surrogate_safe(reason) or "?"
    envelope, error = _timed(
        envelope_body,
        _delivery(body),
        reason=reason,
        error_type="InvalidMessage",
        request_id=request_id if request_id is not None else request_id_of(body),
        now=NOW,
        encoding="base64" if encoding == "base64" else "none",
        mask=_mask,
    )
    assert error is None, f"{type(error).__name__}: {error}"
    assert isinstance(envelope, str)
    assert len(envelope.encode("utf-8")) <= MAX_MESSAGE_BYTES
    letter = decode_body(envelope, strict_text=False)
    info = letter["deadLetter"]
    assert info["reason"].startswith(_mask(reason)[:20])
    assert len(info["reason"]) <= MAX_REASON_CHARS + 200  # the note on a cut body


@given(st.one_of(small_text, long_text(100_000)))
def test_descriptions_of_any_error_are_bounded(text: str) -> None:
    for error in (ValueError(text), PermanentError(text), InvalidMessage(text)):
        assert len(describe(error)) <= MAX_REASON_CHARS


@given(st.lists(names, max_size=16_000), st.integers(0, 30))
def test_listings_are_bounded(items: list[str], shown: int) -> None:
    text = listing(items, shown=shown)
    # Each quoted name is cut; the count of the rest is a number.
    assert len(text) <= shown * 130 + 30
