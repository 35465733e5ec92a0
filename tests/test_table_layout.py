"""The table layout (worker.store.layout): row keys, lossless text split, caps, entity mapping (pure)."""

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.runs.model import Decision, PendingCall, Run, Usage
from worker.store.layout import (
    MAX_ERROR_UNITS,
    MAX_PROPERTY_UNITS,
    MAX_TEXT_UNITS_PER_ROW,
    RUN_PREFIX_END,
    ChatMessage,
    ChatState,
    cap_text,
    join_text,
    message_entity,
    message_from_entity,
    message_row_key,
    request_row_key,
    run_entity,
    run_from_entity,
    run_row_key,
    run_seq_bound,
    split_text,
    split_texts,
    state_entity,
    state_from_entity,
    tool_result_entity,
    tool_result_row_key,
    tool_results_prefix,
    utf16_units,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
MIB = 1024 * 1024
MARKER = "[truncated by assistant-worker:"


def azure_entity_bytes(entity: dict[str, Any]) -> int:
    """An entity's size as Azure counts it against its 1 MiB limit (documented formula)."""
    size = 4 + 2 * (len(entity["PartitionKey"]) + len(entity["RowKey"]))
    for name, value in entity.items():
        if name in ("PartitionKey", "RowKey"):
            continue
        size += 8 + 2 * len(name)
        if isinstance(value, str):
            size += 4 + 2 * utf16_units(value)
        elif isinstance(value, bool):
            size += 1
        else:
            size += 8
    return size


def assert_fits(entity: dict[str, Any]) -> None:
    """Every string property within 64 KiB, the whole entity within 1 MiB and 252 properties."""
    for name, value in entity.items():
        if isinstance(value, str):
            assert utf16_units(value) <= MAX_PROPERTY_UNITS, name
    assert azure_entity_bytes(entity) < MIB
    assert len(entity) <= 252 + 2


def big_json(size: int, key: str = "a") -> str:
    """A JSON object of about ``size`` characters, with non-BMP characters in it."""
    return json.dumps({key: "x😀é" * (size // 4)}, ensure_ascii=False)


def make_run(**changes: Any) -> Run:
    values: dict[str, Any] = {
        "run_id": "run_000007_abcdef0123",
        "seq": 7,
        "status": "in_progress",
        "request_id": "req-1",
        "user_message": "hello",
        "api": "chat",
        "model": "gpt",
        "created_at": NOW,
        "expires_at": NOW + timedelta(minutes=5),
        "params": {"temperature": 0.5},
        "reply_to": "replies",
        "step": 3,
        "phase": "tools",
        "tool_rounds": 2,
        "pending_calls": (PendingCall("call_1", "get_weather", '{"city":"Paris"}'),),
        "handle": {"responseId": "resp_1"},
        "usage": Usage(10, 20, 30),
        "started_at": NOW,
    }
    values.update(changes)
    return Run(**values)


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


def test_counted_split_always_names_its_parts() -> None:
    """A row updated by MERGE always gets the part count, so parts of a longer older text
    left in the row are ignored."""
    longer = split_text("Defaults", "x" * (3 * MAX_PROPERTY_UNITS), counted=True)
    shorter = split_text("Defaults", "short", counted=True)
    assert shorter == {"Defaults": "short", "DefaultsParts": 1}
    assert join_text({**longer, **shorter}, "Defaults") == "short"


@pytest.mark.parametrize("text", ["x" * 1_500_000, "é" * 600_000, "😀" * 300_000, "a😀" * 250_000])
def test_text_too_large_for_a_row_is_cut_with_a_marker(text: str) -> None:
    """Beyond a row's capacity the text keeps its beginning and says it was cut."""
    properties = split_text("Content", text)
    stored = join_text(properties, "Content")
    assert utf16_units(stored) <= MAX_TEXT_UNITS_PER_ROW
    assert utf16_units(stored) > MAX_TEXT_UNITS_PER_ROW - 200
    head, marker = stored.split("\n\n[", 1)
    assert text.startswith(head)
    assert marker.startswith("truncated by assistant-worker: the stored text is limited to ")
    assert f"{utf16_units(text)} characters were received" in marker
    assert_fits({"PartitionKey": "chat", "RowKey": "msg-0001", **properties})


def test_cap_text() -> None:
    """Short text is kept; long text is cut to exactly fit, never inside a surrogate pair."""
    assert cap_text("short", 10) == "short"
    assert cap_text("", 0) == ""
    capped = cap_text("😀" * 1_000, 501)
    assert utf16_units(capped) <= 501
    assert MARKER in capped
    assert capped.encode("utf-16-le", "strict")  # no lone surrogate
    assert utf16_units(cap_text("y" * 1_000, 10)) <= 10


def test_texts_of_a_row_share_its_budget() -> None:
    """JSON listed first stays whole; the text listed last is cut; together they fit."""
    calls = big_json(300_000)
    properties = split_texts([("ToolCalls", calls), ("Content", "c" * 300_000)])
    assert join_text(properties, "ToolCalls") == calls
    content = join_text(properties, "Content")
    assert MARKER in content
    total = utf16_units(calls) + utf16_units(content)
    assert MAX_TEXT_UNITS_PER_ROW - 200 < total <= MAX_TEXT_UNITS_PER_ROW
    # Each text keeps at least some room, even behind a text that fills the row.
    squeezed = split_texts([("A", "a" * 1_000_000), ("B", "b" * 5_000)])
    assert MARKER in join_text(squeezed, "B")


def test_state_round_trips() -> None:
    """The state row uses the extension's property names and reads back the same."""
    state = ChatState("chat", True, NOW, NOW, 3, 42, {"chatModel": "m"})
    entity = state_entity(state)
    assert {"Exists", "CreatedAt", "LastUpdatedAt", "TotalMessages", "TotalTokens"} <= set(entity)
    assert state_from_entity(entity, "etag-1") == ChatState(
        "chat", True, NOW, NOW, 3, 42, {"chatModel": "m"}, "etag-1"
    )


def test_state_with_large_defaults_and_remote_round_trips() -> None:
    """Defaults (tool definitions...) and backend ids past 64 KiB are split and read back."""
    defaults = {"tools": [{"name": f"tool{i}", "description": "d😀" * 300} for i in range(200)]}
    remote = {"threadId": "t" * 100_000}
    state = ChatState("chat", True, NOW, NOW, 3, 42, defaults, active_run_id="r", remote=remote)
    entity = state_entity(state)
    assert "DefaultsPart2" in entity and "RemotePart2" in entity
    assert_fits(entity)
    assert state_from_entity(entity, None) == state


def test_message_round_trips() -> None:
    """A message row reads back the same, with its role as the extension writes it."""
    message = ChatMessage(2, "Tool", "42 degrees", NOW, name="call_1", run_id="run-1")
    entity = message_entity("chat", message)
    assert entity["RowKey"] == "msg-0002"
    assert entity["Role"] == "Tool"
    assert entity["Name"] == "call_1"
    assert entity["ToolCalls"] == ""
    assert message_from_entity(entity) == message


def test_large_tool_calls_and_content_round_trip() -> None:
    """An assistant message with 100 KiB of tool-call JSON and long content is split and read
    back whole; the extension's ``ToolCalls`` holds the JSON's beginning."""
    calls = big_json(100_000, "functionArguments")
    message = ChatMessage(3, "Assistant", "thinking " * 20_000, NOW, tool_calls=calls)
    entity = message_entity("chat", message)
    assert entity["ToolCallsParts"] > 1
    assert calls.startswith(entity["ToolCalls"])
    assert_fits(entity)
    assert message_from_entity(entity) == message


def test_message_too_large_for_a_row_keeps_its_tool_calls() -> None:
    """Content beyond the row's budget is cut with a marker; the tool calls stay whole."""
    calls = big_json(200_000)
    message = ChatMessage(3, "Assistant", "é" * 1_000_000, NOW, tool_calls=calls)
    entity = message_entity("chat", message)
    assert_fits(entity)
    stored = message_from_entity(entity)
    assert stored.tool_calls == calls
    assert MARKER in stored.content


def test_run_round_trips() -> None:
    """A run row reads back the same; it does not keep the final answer."""
    run = make_run(content="the answer", error="boom")
    entity = run_entity("chat", run)
    assert entity["RowKey"] == "run-run_000007_abcdef0123"
    assert not any(name.startswith("Answer") for name in entity)
    assert run_from_entity(entity, "etag") == make_run(error="boom", etag="etag")


def test_large_run_properties_round_trip() -> None:
    """Params, PendingCalls, Handle, Usage and UserMessage past 64 KiB are split and read
    back whole, together within one row."""
    run = make_run(
        params={"tools": big_json(90_000)},
        pending_calls=tuple(
            PendingCall(f"call_{i}", "write_file", big_json(20_000)) for i in range(5)
        ),
        handle={"previous": big_json(70_000)},
        usage=Usage(1, 2, 3),
        user_message="u😀" * 40_000,
    )
    entity = run_entity("chat", run)
    for name in ("Params", "PendingCalls", "Handle", "UserMessage"):
        assert f"{name}Part2" in entity, name
    assert_fits(entity)
    assert run_from_entity(entity, None) == run


def test_huge_run_fits_its_row() -> None:
    """However large a run's texts, its row fits: the user message (last) is cut first."""
    run = make_run(
        pending_calls=(PendingCall("call_1", "f", big_json(150_000)),),
        user_message="m" * 2_000_000,
        error="e" * 100_000,
    )
    entity = run_entity("chat", run)
    assert_fits(entity)
    back = run_from_entity(entity, None)
    assert back.pending_calls == run.pending_calls
    assert MARKER in back.user_message
    assert back.error is not None and utf16_units(back.error) <= MAX_ERROR_UNITS


def test_tool_result_keys_carry_the_round() -> None:
    """The same call id in two rounds of a run gets two rows; rounds do not share prefixes."""
    assert tool_results_prefix("run_000001_x", 2) == "tool-run_000001_x-002-"
    first = tool_result_row_key("run_000001_x", 1, "call_1")
    second = tool_result_row_key("run_000001_x", 2, "call_1")
    assert first != second
    assert first.startswith(tool_results_prefix("run_000001_x", 1))
    assert not second.startswith(tool_results_prefix("run_000001_x", 1))
    # Round 100's range ("...-100-" up to "...-100.") holds no key of round 1000.
    key_1000 = tool_result_row_key("r", 1000, "c")
    assert not tool_results_prefix("r", 100) <= key_1000 < tool_results_prefix("r", 100)[:-1] + "."


def test_tool_result_output_round_trips_or_is_capped() -> None:
    """A tool output is split across properties; past the row's budget it is capped."""
    output = "o😀" * 50_000
    entity = tool_result_entity("chat", "run_000001_x", 1, "call/1", output)
    assert entity["CallId"] == "call/1"
    assert entity["Round"] == 1
    assert join_text(entity, "Output") == output
    huge = tool_result_entity("chat", "run_000001_x", 1, "call/1", "z" * 1_500_000)
    assert_fits(huge)
    assert MARKER in join_text(huge, "Output")


def test_run_seq_bound_skips_older_runs() -> None:
    """The bound sorts after every key of runs up to the sequence, before every later one."""
    bound = run_seq_bound(41)
    for seq, suffix in [(1, "zzzz"), (41, "ffffffffff"), (41, "~~~~"), (41, "")]:
        assert run_row_key(f"run_{seq:06d}_{suffix}") < bound
    for seq in (42, 100, 999_999):
        assert bound < run_row_key(f"run_{seq:06d}_0000000000") < RUN_PREFIX_END


def test_pending_calls_larger_than_a_row_keep_every_call() -> None:
    """Calls whose arguments together pass what a run row holds are all kept (their
    arguments cut, with a marker), never cut into JSON that reads back as no calls."""
    calls = tuple(PendingCall(f"call_{i}", "write_file", "x" * 200_000) for i in range(4))
    run = make_run(pending_calls=calls)
    entity = run_entity("chat", run)
    assert_fits(entity)
    back = run_from_entity(entity, None)
    assert [c.id for c in back.pending_calls] == [c.id for c in calls]
    assert all(c.name == "write_file" for c in back.pending_calls)
    assert all("truncated" in c.arguments for c in back.pending_calls)


def test_answered_calls_round_trip() -> None:
    """Which calls of the round already have an output survives the row."""
    run = make_run(answered_calls=("call_a", "call_b"))
    assert run_from_entity(run_entity("chat", run), None).answered_calls == ("call_a", "call_b")


def test_approvals_round_trip_on_the_run_row() -> None:
    """A call's approval, its decision (who, why, when), its MCP server, and the run's
    decided calls survive the run row; rows written before approvals read as none."""
    decision = Decision(approve=True, at=NOW, reason="ok by policy", by="ana@example.com")
    calls = (
        PendingCall("call_1", "send_email", "{}", approval=True, decision=decision),
        PendingCall("call_2", "bank__pay", "{}", approval=True, server="bank"),
        PendingCall("call_3", "get_weather", "{}"),
    )
    run = make_run(pending_calls=calls, decided_calls=(("call_0", False), ("call_1", True)))
    back = run_from_entity(run_entity("chat", run), None)
    assert back.pending_calls == calls
    assert back.decided_calls == (("call_0", False), ("call_1", True))
    assert '"approval"' not in json.dumps(run_entity("chat", make_run())["PendingCalls"])


def test_a_decision_is_kept_on_the_tool_message_row() -> None:
    """The Tool message of a decided call keeps the decision in properties the extension
    ignores (Approval, ApprovalBy, ApprovalReason, ApprovalAt); other rows have none."""
    decision = Decision(approve=False, at=NOW, reason="no mail on Sundays", by="bo")
    message = ChatMessage(4, "Tool", "denied: no mail on Sundays", NOW, name="call_1",
                          run_id="run_1", decision=decision)  # fmt: skip
    entity = message_entity("chat", message)
    assert (entity["Approval"], entity["ApprovalBy"]) == ("denied", "bo")
    assert (entity["ApprovalReason"], entity["ApprovalAt"]) == ("no mail on Sundays", NOW)
    assert message_from_entity(entity) == message
    plain = message_entity("chat", ChatMessage(5, "Tool", "sunny", NOW, name="call_2"))
    assert not any(key.startswith("Approval") for key in plain)
    assert message_from_entity(plain).decision is None
    anonymous = replace(decision, by=None, reason=None, approve=True)
    entity = message_entity("chat", replace(message, decision=anonymous))
    assert message_from_entity(entity).decision == anonymous
