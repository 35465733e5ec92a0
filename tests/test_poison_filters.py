"""Unit tests of the pure dead-letter logic behind ``assistant-worker poison``."""

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import decode_body, encode_body
from worker.deadletters.envelope import build_envelope
from worker.deadletters.operations import (
    INVALID_TYPE,
    NOT_AN_ENVELOPE,
    DeadLetterItem,
    Filters,
    describe_counts,
    message_type_of,
    parse_since,
    poison_queue_for,
    replay_body,
    replay_message,
    select,
    table_lines,
    work_queue_of,
)
from worker.queues.transport import Delivery

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POISON = "assistant-requests-poison"


def envelope(
    body: Any,
    *,
    message_id: str = "m-1",
    reason: str = "invalid assistantCreate: field 'id' is required",
    error_type: str = "InvalidMessage",
    when: datetime = NOW,
    queue: str = "assistant-requests",
) -> dict[str, Any]:
    text = body if isinstance(body, str) else json.dumps(body)
    delivery = Delivery(queue, message_id, "receipt", 1, text, inserted_on=when)
    return build_envelope(delivery, reason=reason, error_type=error_type, request_id=None, now=when)


def item(payload: Any, poison_id: str = "p-1", *, encoding: str = "none") -> DeadLetterItem:
    text = payload if isinstance(payload, str) else encode_body(payload, encoding)  # type: ignore[arg-type]
    return DeadLetterItem.parse(POISON, poison_id, text)


CREATE = {"type": "assistantCreate", "id": "chat-1"}
POST = {"id": "chat-2", "userMessage": "hi"}  # the extension's untyped post
TOOLS = {"id": "chat-3", "toolOutputs": [], "runId": "r"}


# --- parsing ---------------------------------------------------------------------------------


def test_an_envelope_is_parsed_with_its_details() -> None:
    parsed = item(envelope(CREATE, message_id="orig-1"))
    assert parsed.is_envelope
    assert parsed.message_type == "assistantCreate"
    assert parsed.chat_id == "chat-1"
    assert parsed.original_message_id == "orig-1"
    assert parsed.original_queue == "assistant-requests"
    assert parsed.reason.startswith("invalid assistantCreate")
    assert parsed.error_type == "InvalidMessage"
    assert parsed.dead_lettered_on == NOW
    assert parsed.dequeue_count == 1
    assert parsed.document()["deadLetter"]["messageId"] == "orig-1"


def test_a_base64_envelope_is_parsed() -> None:
    parsed = item(envelope(CREATE), encoding="base64")
    assert parsed.is_envelope and parsed.chat_id == "chat-1"


@pytest.mark.parametrize(
    "body",
    [
        "plain text",
        '{"type": "assistantCreate", "id": "x"}',
        "[1, 2]",
        '{"deadLetter": 5}',
        "",
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_a_body_that_is_not_an_envelope_is_told_apart(body: str) -> None:
    parsed = DeadLetterItem.parse(POISON, "p-9", body)
    assert not parsed.is_envelope
    assert parsed.reason == NOT_AN_ENVELOPE
    assert parsed.message_type is None and parsed.chat_id is None
    assert parsed.original_queue == "assistant-requests"
    assert parsed.document()["body"] == body
    assert parsed.summary()["isEnvelope"] is False


def test_an_envelope_with_a_broken_dead_letter_section_is_not_an_envelope() -> None:
    broken = {"deadLetter": {"reason": "x"}, "message": CREATE}
    assert not item(broken).is_envelope


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (CREATE, "assistantCreate"),
        ({"type": "assistantDelete", "id": "a"}, "assistantDelete"),
        (POST, "assistantPost"),
        (TOOLS, "submitToolOutputs"),
        ({"id": "x"}, "assistantCreate"),
        ({"type": "bogus"}, "bogus"),
        ({"type": 7}, INVALID_TYPE),
        ("not json", INVALID_TYPE),
        ([1, 2], INVALID_TYPE),
    ],
)
def test_message_type_of(message: Any, expected: str) -> None:
    assert message_type_of(message) == expected


def test_raw_text_dead_letters_have_type_invalid() -> None:
    parsed = item(envelope("hello, not JSON"))
    assert parsed.original == "hello, not JSON"
    assert parsed.message_type == INVALID_TYPE
    assert parsed.chat_id is None


def test_nested_envelopes_are_unwrapped_for_type_and_chat() -> None:
    inner = envelope(POST, message_id="first")
    outer = envelope(inner, message_id="second")
    parsed = item(outer)
    assert parsed.message_type == "assistantPost"
    assert parsed.chat_id == "chat-2"


def test_queue_names() -> None:
    assert poison_queue_for("assistant-requests") == "assistant-requests-poison"
    assert poison_queue_for("assistant-requests-poison") == "assistant-requests-poison"
    assert work_queue_of("assistant-runs-poison") == "assistant-runs"


# --- --since ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31T12:00:00Z", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T12:00:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC)),
        ("2026-01-31T14:00:00+02:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("1.5d", NOW - timedelta(days=1.5)),
        ("45s", NOW - timedelta(seconds=45)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "", "2026-13-01"])
def test_parse_since_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_since(text, NOW)


# --- filters ---------------------------------------------------------------------------------


@pytest.fixture
def items() -> list[DeadLetterItem]:
    return [
        item(envelope(CREATE, message_id="o-1", when=NOW - timedelta(hours=3)), "p-1"),
        item(
            envelope(
                {**CREATE, "id": "chat-9"},
                message_id="o-2",
                reason="chatStorageConnectionSetting 'Other' is not allowed",
                error_type="SettingNotAllowed",
                when=NOW - timedelta(hours=1),
            ),
            "p-2",
        ),
        item(envelope(POST, message_id="o-3", when=NOW), "p-3"),
        item(envelope("garbage", message_id="o-4", reason="not JSON", when=NOW), "p-4"),
        DeadLetterItem.parse(POISON, "p-5", "a message moved here by the Functions host"),
    ]


def ids(selected: list[DeadLetterItem]) -> list[str]:
    return [entry.message_id for entry in selected]


def test_no_filter_selects_everything(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters())) == ["p-1", "p-2", "p-3", "p-4", "p-5"]
    assert not Filters().has_criteria


def test_envelopes_only_leaves_out_foreign_messages(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(), envelopes_only=True)) == ["p-1", "p-2", "p-3", "p-4"]


def test_filter_by_type_case_insensitively(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(message_type="assistantCreate"))) == ["p-1", "p-2"]
    assert ids(select(items, Filters(message_type="ASSISTANTPOST"))) == ["p-3"]
    assert ids(select(items, Filters(message_type="invalid"))) == ["p-4"]


def test_filter_by_chat_id(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(chat_id="chat-9"))) == ["p-2"]
    assert ids(select(items, Filters(chat_id="CHAT-9"))) == []


def test_filter_by_error_in_reason_or_error_type(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(error="settingnotallowed"))) == ["p-2"]
    assert ids(select(items, Filters(error="IS NOT ALLOWED"))) == ["p-2"]
    assert ids(select(items, Filters(error="not json"))) == ["p-4"]
    assert ids(select(items, Filters(error="InvalidMessage"))) == ["p-1", "p-3", "p-4"]


def test_filter_by_since_is_inclusive(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(since=NOW - timedelta(hours=1)))) == ["p-2", "p-3", "p-4"]
    assert ids(select(items, Filters(since=NOW))) == ["p-3", "p-4"]
    assert ids(select(items, Filters(since=NOW + timedelta(seconds=1)))) == []


def test_filters_combine(items: list[DeadLetterItem]) -> None:
    both = Filters(message_type="assistantCreate", since=NOW - timedelta(hours=2))
    assert ids(select(items, both)) == ["p-2"]


def test_ids_match_the_poison_or_the_original_message_id(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(ids=("p-3", "o-1")))) == ["p-1", "p-3"]
    # A foreign message is selected by its id, even when only envelopes are replayed.
    assert ids(select(items, Filters(ids=("p-5",)), envelopes_only=True)) == ["p-5"]
    # ...but no filter can match it: it has no type, chat, reason or time.
    assert ids(select(items, Filters(ids=("p-5",), error="moved"))) == []
    assert ids(select(items, Filters(ids=("p-1",), message_type="assistantPost"))) == []


def test_limit_takes_the_first_matches(items: list[DeadLetterItem]) -> None:
    assert ids(select(items, Filters(), limit=2)) == ["p-1", "p-2"]
    assert ids(select(items, Filters(message_type="invalid"), limit=5)) == ["p-4"]


def test_has_criteria() -> None:
    assert Filters(error="x").has_criteria
    assert Filters(since=NOW).has_criteria
    assert not Filters(ids=("a",)).has_criteria


# --- replay bodies ---------------------------------------------------------------------------


def test_replay_adds_the_original_message_id_as_request_id() -> None:
    replayed = replay_message(item(envelope(CREATE, message_id="orig-7")))
    assert replayed == {**CREATE, "requestId": "orig-7"}


def test_replay_keeps_an_existing_request_id() -> None:
    replayed = replay_message(item(envelope({**CREATE, "requestId": "r-1"}, message_id="o")))
    assert replayed == {**CREATE, "requestId": "r-1"}


def test_replay_of_raw_text_is_unchanged() -> None:
    parsed = item(envelope("  not JSON, {really}  "))
    assert replay_message(parsed) == "  not JSON, {really}  "
    assert replay_body(parsed, "base64") == "  not JSON, {really}  "


def test_replay_of_a_foreign_message_is_its_body() -> None:
    parsed = DeadLetterItem.parse(POISON, "p", "eyJpZCI6ICJ4In0=")
    assert replay_body(parsed, "none") == "eyJpZCI6ICJ4In0="


def test_replay_of_a_nested_envelope_is_the_innermost_message() -> None:
    outer = envelope(envelope(POST, message_id="first"), message_id="second")
    assert replay_message(item(outer)) == {**POST, "requestId": "first"}


def test_replay_body_uses_the_encoding() -> None:
    parsed = item(envelope(CREATE, message_id="o-5"))
    plain = replay_body(parsed, "none")
    assert json.loads(plain) == {**CREATE, "requestId": "o-5"}
    encoded = replay_body(parsed, "base64")
    assert json.loads(base64.b64decode(encoded)) == {**CREATE, "requestId": "o-5"}
    assert decode_body(encoded) == decode_body(plain)


def test_a_base64_original_is_replayed_as_json() -> None:
    # The worker stores the decoded JSON of a Base64 body; replay writes it in the encoding.
    original = base64.b64encode(json.dumps(CREATE).encode()).decode()
    parsed = item(envelope(original, message_id="o-6"))
    assert parsed.message_type == "assistantCreate"
    assert json.loads(replay_body(parsed, "none")) == {**CREATE, "requestId": "o-6"}


# --- output ----------------------------------------------------------------------------------


def test_describe_counts() -> None:
    assert describe_counts(3, 3, 2, filtered=False) == "3 dead letters (2 shown)"
    assert describe_counts(1, 1, 1, filtered=False) == "1 dead letter (1 shown)"
    assert describe_counts(5, 2, 2, filtered=True) == "5 dead letters, 2 matching (2 shown)"
    assert describe_counts(0, 0, 0, filtered=True) == "0 dead letters (0 shown)"


def test_table_lines_are_aligned(items: list[DeadLetterItem]) -> None:
    lines = table_lines(items)
    assert lines[0].startswith("MESSAGE ID")
    assert len(lines) == 6
    reason_column = lines[0].index("REASON")
    assert lines[2][reason_column:].startswith("chatStorageConnectionSetting 'Other'")
    assert "chat-9" in lines[2] and "SettingNotAllowed" not in lines[2]
    assert lines[5][reason_column:] == NOT_AN_ENVELOPE
    assert "2026-03-01T11:00:00Z" in lines[2]
