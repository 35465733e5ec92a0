"""The table layout: row keys, lossless text split, entity mapping (pure)."""

from datetime import UTC, datetime

import pytest

from worker.store.layout import (
    MAX_PROPERTY_UNITS,
    MAX_TEXT_UNITS_PER_ROW,
    ChatMessage,
    ChatState,
    join_text,
    message_entity,
    message_from_entity,
    message_row_key,
    request_row_key,
    split_text,
    state_entity,
    state_from_entity,
    utf16_units,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_message_row_keys_are_the_extensions() -> None:
    """1-based, four uppercase hex digits: msg-0001, msg-001B."""
    assert message_row_key(1) == "msg-0001"
    assert message_row_key(27) == "msg-001B"


def test_request_row_keys_are_safe_and_stable() -> None:
    """Any request id maps to a valid, stable key outside the extension's prefixes."""
    key = request_row_key("a/b#c?d\\e")
    assert key.startswith("req-")
    assert not any(ch in key for ch in "/\\#?")
    assert key == request_row_key("a/b#c?d\\e")
    assert key != request_row_key("other")


@pytest.mark.parametrize("size", [0, 10, MAX_PROPERTY_UNITS, MAX_PROPERTY_UNITS + 1, 200_000])
def test_text_split_is_lossless(size: int) -> None:
    """Text of any size that fits a row is split into properties and joined back exactly."""
    text = ("ab😀" * size)[:size]
    properties = split_text("Content", text)
    assert join_text(properties, "Content") == text
    assert all(
        utf16_units(value) <= MAX_PROPERTY_UNITS
        for value in properties.values()
        if isinstance(value, str)
    )
    # The extension reads only "Content": it still gets the text's beginning.
    assert text.startswith(properties["Content"])


@pytest.mark.parametrize("text", ["abc" * 30_000, "é" * 70_000, "😀" * 40_000, "a😀" * 25_000])
def test_chunks_respect_utf16_limits(text: str) -> None:
    """Characters outside the BMP count twice, as Table Storage counts them."""
    properties = split_text("Content", text)
    assert join_text(properties, "Content") == text
    for value in properties.values():
        if isinstance(value, str):
            assert utf16_units(value) <= MAX_PROPERTY_UNITS
            assert utf16_units(value) == len(value.encode("utf-16-le")) // 2


def test_text_too_large_for_a_row_is_refused() -> None:
    """Beyond one entity's capacity the split refuses instead of losing text."""
    with pytest.raises(ValueError, match="fit in one row"):
        split_text("Content", "x" * (MAX_TEXT_UNITS_PER_ROW + 1))


def test_state_round_trips() -> None:
    """The state row uses the extension's property names and reads back the same."""
    state = ChatState("chat", True, NOW, NOW, 3, 42, {"chatModel": "m"})
    entity = state_entity(state)
    assert {"Exists", "CreatedAt", "LastUpdatedAt", "TotalMessages", "TotalTokens"} <= set(entity)
    assert state_from_entity(entity, "etag-1") == ChatState(
        "chat", True, NOW, NOW, 3, 42, {"chatModel": "m"}, "etag-1"
    )


def test_message_round_trips() -> None:
    """A message row reads back the same, with its role as the extension writes it."""
    message = ChatMessage(2, "Tool", "42 degrees", NOW, name="call_1", run_id="run-1")
    entity = message_entity("chat", message)
    assert entity["RowKey"] == "msg-0002"
    assert entity["Role"] == "Tool"
    assert entity["Name"] == "call_1"
    assert message_from_entity(entity) == message
