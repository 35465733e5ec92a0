"""The history sent to the model: estimates, context windows, repair, caps, trimming, encoding."""

import json
import math

import pytest

from worker.runs.history import (
    MISSING_TOOL_RESULT,
    ModelMessage,
    ToolCallRef,
    cap_tool_output,
    context_window,
    estimate_tokens,
    estimate_total,
    prepare_for_model,
    repair_tool_pairs,
    request_overhead_tokens,
    to_chat_messages,
    token_budget,
    trim_history,
)


def system(text: str = "You are a helpful assistant.") -> ModelMessage:
    return ModelMessage("system", text)


def user(text: str) -> ModelMessage:
    return ModelMessage("user", text)


def assistant(text: str = "", *call_ids: str) -> ModelMessage:
    calls = tuple(ToolCallRef(call_id, "get_weather", '{"city": "Oslo"}') for call_id in call_ids)
    return ModelMessage("assistant", text, calls)


def tool(call_id: str, text: str = "sunny") -> ModelMessage:
    return ModelMessage("tool", text, tool_call_id=call_id)


class TestEstimates:
    """The cheap token estimate."""

    def test_grows_with_content_and_tool_calls(self) -> None:
        """More text or more calls never estimate fewer tokens."""
        sizes = [estimate_tokens(user("x" * n)) for n in (0, 1, 4, 5, 400, 4000)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
        assert estimate_tokens(assistant("", "a")) < estimate_tokens(assistant("", "a", "b"))

    def test_roughly_four_characters_per_token_plus_overhead(self) -> None:
        """English text counts about a quarter of its length."""
        assert estimate_tokens(user("x" * 4000)) - estimate_tokens(user("")) == 1000

    def test_non_latin_text_is_not_under_counted(self) -> None:
        """Three-byte characters count more than ASCII of the same length."""
        assert estimate_tokens(user("天" * 400)) > estimate_tokens(user("x" * 400))

    def test_total_is_the_sum(self) -> None:
        """The total of a list is the sum of its messages."""
        messages = [system(), user("hi"), assistant("hello")]
        assert estimate_total(messages) == sum(estimate_tokens(m) for m in messages)
        assert estimate_total([]) == 0


class TestContextWindow:
    """Context windows by model family, deployment names included."""

    @pytest.mark.parametrize(
        ("model", "tokens"),
        [
            ("gpt-4o", 128000),
            ("GPT-4o-mini", 128000),
            ("gpt-4o-mini-2024-07-18", 128000),
            ("gpt-4.1", 1047576),
            ("gpt-4.1-nano", 1047576),
            ("gpt-41-mini", 1047576),
            ("gpt-5", 400000),
            ("gpt-5-mini", 400000),
            ("o1", 200000),
            ("o3-mini", 200000),
            ("o4-mini", 200000),
            ("gpt-35-turbo", 16385),
            ("gpt-3.5-turbo", 16385),
            ("prod-gpt-4o-mini", 128000),
            ("team_o3", 200000),
            ("my-deployment", 128000),
            ("llama3.1:8b", 128000),
            ("", 128000),
        ],
    )
    def test_known_families(self, model: str, tokens: int) -> None:
        """Known families by prefix, case-insensitive; unknown names get 128000."""
        assert context_window(model) == tokens

    def test_family_needs_a_boundary(self) -> None:
        """ "gpt-4o-1" is not read as "o1"."""
        assert context_window("gpt-4o-1") == 128000

    def test_budget_is_three_quarters_by_default(self) -> None:
        """The SPEC's default budget is 75% of the window."""
        assert token_budget("gpt-4o") == 96000
        assert token_budget("gpt-4o", 0.5) == 64000


class TestTrim:
    """Trimming to a budget keeps system messages, whole groups and the newest group."""

    HISTORY = (
        system(),
        user("first " * 50),
        assistant("", "c1", "c2"),
        tool("c1", "a" * 400),
        tool("c2", "b" * 400),
        assistant("it is sunny " * 20),
        user("second " * 50),
        assistant("", "c3"),
        tool("c3", "c" * 200),
        assistant("done"),
    )

    def test_fits_unchanged(self) -> None:
        """A history within budget is returned whole, as a new list."""
        messages = list(self.HISTORY)
        trimmed = trim_history(messages, 1_000_000)
        assert trimmed == messages and trimmed is not messages

    # HISTORY after its system message, as groups (a message and the tool results after it).
    GROUPS = ((1,), (2, 3, 4), (5,), (6,), (7, 8), (9,))
    # What goes first: the older turn, oldest first; then the current turn's earlier round.
    # The current user message (group 3) and the newest group (5) never go.
    DROP_ORDER = (0, 1, 2, 4)

    def test_drops_oldest_groups_first_and_never_splits_tool_rounds(self) -> None:
        """Each budget drops the fewest whole groups, in DROP_ORDER, that make it fit."""
        messages = list(self.HISTORY)
        for budget in range(0, estimate_total(messages) + 10, 7):
            trimmed = trim_history(messages, budget)
            for dropped in range(len(self.DROP_ORDER) + 1):
                gone = {i for g in self.DROP_ORDER[:dropped] for i in self.GROUPS[g]}
                expected = [m for i, m in enumerate(messages) if i not in gone]
                if estimate_total(expected) <= budget or dropped == len(self.DROP_ORDER):
                    break
            assert trimmed == expected, budget
            # Never a tool message without its assistant message just before the results.
            for index, message in enumerate(trimmed):
                if message.role == "tool":
                    assert trimmed[index - 1].role in ("assistant", "tool")

    def test_keeps_the_current_user_message_and_newest_group_even_over_budget(self) -> None:
        """One tool round alone over the budget: the current user message still goes with it
        (the model must see what it is answering); the older turn goes."""
        messages = [
            system(),
            user("older question"),
            assistant("older answer"),
            user("now"),
            assistant("", "c1"),
            tool("c1", "x" * 100_000),
        ]
        assert trim_history(messages, 10) == [messages[0], *messages[3:]]

    def test_the_current_turns_earlier_rounds_go_before_its_user_message(self) -> None:
        """Several rounds of the current turn over the budget: its earlier rounds are dropped
        (oldest first), never its user message or its newest round."""
        messages = [
            system(),
            user("now"),
            assistant("", "c1"),
            tool("c1", "a" * 40_000),
            assistant("", "c2"),
            tool("c2", "b" * 40_000),
            assistant("", "c3"),
            tool("c3", "c" * 400),
        ]
        budget = estimate_total([*messages[:2], *messages[4:]])
        assert trim_history(messages, budget) == [*messages[:2], *messages[4:]]
        assert trim_history(messages, 10) == [*messages[:2], *messages[6:]]

    def test_without_a_user_message_the_newest_group_is_kept(self) -> None:
        """A history with no user message at all keeps its newest group, as before."""
        messages = [system(), assistant("a" * 4000), assistant("", "c1"), tool("c1")]
        assert trim_history(messages, 10) == [messages[0], *messages[2:]]

    def test_keeps_every_leading_system_message(self) -> None:
        """All leading system messages stay; a later one is an ordinary group."""
        messages = [system("a"), system("b"), user("q1"), system("run"), user("q2")]
        assert trim_history(messages, 0) == [messages[0], messages[1], messages[4]]

    def test_input_is_untouched(self) -> None:
        """The caller's list is not modified."""
        messages = list(self.HISTORY)
        trim_history(messages, 0)
        assert messages == list(self.HISTORY)

    def test_only_system_messages(self) -> None:
        """A history of system messages alone is returned as is."""
        assert trim_history([system()], 0) == [system()]
        assert trim_history([], 0) == []


class TestRepair:
    """Repairing unanswered tool calls and stray tool messages."""

    def test_valid_history_is_unchanged(self) -> None:
        """Nothing to repair: the same messages in the same order."""
        messages = [system(), user("q"), assistant("", "c1", "c2"), tool("c2"), tool("c1")]
        assert repair_tool_pairs(messages) == messages

    def test_unanswered_calls_get_an_error_after_the_existing_answers(self) -> None:
        """A missing answer is inserted after the recorded ones, in call order."""
        messages = [user("q"), assistant("", "c1", "c2", "c3"), tool("c2"), user("next")]
        assert repair_tool_pairs(messages) == [
            user("q"),
            assistant("", "c1", "c2", "c3"),
            tool("c2"),
            tool("c1", MISSING_TOOL_RESULT),
            tool("c3", MISSING_TOOL_RESULT),
            user("next"),
        ]

    def test_capped_round_at_the_end(self) -> None:
        """An assistant message with calls as the last message gets its answers."""
        messages = [user("q"), assistant("", "c1")]
        assert repair_tool_pairs(messages)[-1] == tool("c1", MISSING_TOOL_RESULT)

    def test_orphan_and_duplicate_tool_messages_are_dropped(self) -> None:
        """Tool messages nobody asked for, or answering twice, are removed."""
        messages = [
            tool("early"),
            user("q"),
            assistant("", "c1"),
            tool("c1", "first"),
            tool("c1", "again"),
            tool("nobody"),
            assistant("ok"),
        ]
        assert repair_tool_pairs(messages) == [
            user("q"),
            assistant("", "c1"),
            tool("c1", "first"),
            assistant("ok"),
        ]

    def test_misplaced_answer_moves_up_to_its_call(self) -> None:
        """A recorded answer after another message is moved next to its assistant message."""
        messages = [assistant("", "c1", "c2"), tool("c1"), user("hi"), tool("c2", "late")]
        assert repair_tool_pairs(messages) == [
            assistant("", "c1", "c2"),
            tool("c1"),
            tool("c2", "late"),
            user("hi"),
        ]

    def test_result_is_always_valid(self) -> None:
        """After repair every tool call is answered right after its message, and only once."""
        messages = [
            tool("x"),
            assistant("", "a", "b"),
            user("u"),
            tool("b"),
            assistant("", "c"),
            tool("a"),
            tool("c"),
            tool("c"),
        ]
        repaired = repair_tool_pairs(messages)
        for index, message in enumerate(repaired):
            if message.role == "assistant" and message.tool_calls:
                ids = [call.id for call in message.tool_calls]
                answers = repaired[index + 1 : index + 1 + len(ids)]
                assert sorted(m.tool_call_id or "" for m in answers) == sorted(ids)
                assert all(m.role == "tool" for m in answers)
        assert sum(m.role == "tool" for m in repaired) == 3


class TestCap:
    """Capping tool outputs with an explicit marker."""

    def test_short_text_is_unchanged(self) -> None:
        """Text at or under the cap is returned as it is."""
        assert cap_tool_output("x" * 100, 100) == "x" * 100

    def test_long_text_is_cut_with_a_marker(self) -> None:
        """The beginning is kept and the marker says how much was shown."""
        text = "y" * 204_800
        capped = cap_tool_output(text)
        marker = "\n\n[truncated by assistant-worker: showing 65,536 of 204,800 characters]"
        assert capped == "y" * 65_536 + marker
        assert len(capped) == 65_536 + len(marker)

    def test_prepare_caps_tool_outputs_only(self) -> None:
        """``prepare_for_model`` caps tool messages, repairs and trims; user text is never cut."""
        messages = [system(), user("u" * 500), assistant("", "c1"), tool("c1", "t" * 500)]
        prepared = prepare_for_model(messages, 1_000_000, max_tool_output_chars=100)
        assert prepared[1].content == "u" * 500
        assert prepared[3].content.startswith("t" * 100 + "\n\n[truncated")


def schema(name: str, description: str) -> dict[str, object]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }


class TestBudget:
    """What the request sends beside the history counts in the budget; the current user
    message is always sent."""

    TOOLS = tuple(schema(f"tool_{n}", "Looks something up. " * 40) for n in range(3))
    HISTORY = (
        system(),
        user("first " * 200),
        assistant("answer " * 200),
        user("second " * 200),
        assistant("answer " * 200),
        user("now?"),
    )

    def test_tool_schemas_are_estimated_as_the_json_sent(self) -> None:
        """The schemas count a quarter of their JSON's bytes; none count nothing."""
        text = json.dumps(list(self.TOOLS), separators=(",", ":"))
        assert request_overhead_tokens(self.TOOLS) == math.ceil(len(text) / 4)
        assert request_overhead_tokens() == 0
        assert request_overhead_tokens(self.TOOLS[:1]) < request_overhead_tokens(self.TOOLS)

    def test_instructions_count_as_a_system_message(self) -> None:
        """The run's extra instructions count as the message they are sent as."""
        text = "Answer in French. " * 100
        assert request_overhead_tokens((), text) == estimate_tokens(system(text))
        assert request_overhead_tokens((), "") == 0
        both = request_overhead_tokens(self.TOOLS, text)
        assert both == request_overhead_tokens(self.TOOLS) + estimate_tokens(system(text))

    def test_tool_schemas_leave_less_room_for_the_history(self) -> None:
        """A history that fits the budget alone loses its oldest turns to the tool schemas,
        so that schemas and history together fit."""
        messages = list(self.HISTORY)
        budget = estimate_total(messages)
        assert prepare_for_model(messages, budget) == messages
        prepared = prepare_for_model(messages, budget, tools=self.TOOLS)
        assert prepared[0] == messages[0] and prepared[-1] == messages[-1]
        assert len(prepared) < len(messages)
        assert estimate_total(prepared) + request_overhead_tokens(self.TOOLS) <= budget

    def test_instructions_leave_less_room_for_the_history(self) -> None:
        """The same for the run's extra instructions."""
        messages = list(self.HISTORY)
        budget = estimate_total(messages)
        instructions = "Be very thorough. " * 100
        prepared = prepare_for_model(messages, budget, instructions=instructions)
        assert prepared == [messages[0], *messages[3:]]
        assert estimate_total(prepared) + estimate_tokens(system(instructions)) <= budget

    def test_overhead_over_the_budget_still_sends_the_current_turn(self) -> None:
        """Schemas larger than the whole budget: the system message, the current user
        message and the newest round are still sent (capped), never an empty history."""
        messages = [
            *self.HISTORY,
            assistant("", "c1"),
            tool("c1", "t" * 200_000),
        ]
        prepared = prepare_for_model(messages, 100, tools=self.TOOLS, instructions="Be brief.")
        assert [m.role for m in prepared] == ["system", "user", "assistant", "tool"]
        assert prepared[1] == user("now?")
        assert prepared[3].content.startswith("t" * 65_536 + "\n\n[truncated")


class TestEncoding:
    """The Chat Completions ``messages`` array."""

    def test_roles_tool_calls_and_tool_results(self) -> None:
        """Assistant calls and tool results take the API's shape."""
        messages = [system("s"), user("q"), assistant("", "c1"), tool("c1", "42"), assistant("a")]
        assert to_chat_messages(messages) == [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "assistant", "content": "a"},
        ]

    def test_tool_message_needs_a_call_id(self) -> None:
        """An unrepaired stray tool message is a programming error, said plainly."""
        with pytest.raises(ValueError, match="tool_call_id"):
            to_chat_messages([ModelMessage("tool", "x")])

    def test_unknown_role_is_refused(self) -> None:
        """A role read from storage must be one of the four."""
        with pytest.raises(ValueError, match="unknown message role"):
            ModelMessage("Tool", "x")  # type: ignore[arg-type]
