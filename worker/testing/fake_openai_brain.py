"""What the fake model says: one brain shared by Chat Completions, Responses and Assistants.

Each API turns its request into one normalized `Conversation` (system/instructions, user and
assistant messages, assistant tool calls, tool results) and asks `Brain.decide` for a `Reply`:

1. the next scripted turn queued for that model name (`Brain.script`), else for `"*"`;
2. else the scenario the model name asks for (`"weather"` or `"echo"` in the name);
3. else the default scenario (`Brain.set_default`: a name or a callable).

A turn is a mapping `{"content": "text"}` and/or `{"tool_calls": [{"name": "f", "arguments":
{...}}, ...]}`; tool-call ids are generated when the turn is used, so a script can be replayed.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.testing.fake_openai_common import dumps_compact, estimate_tokens, new_id

__all__ = [
    "SCENARIOS",
    "Brain",
    "Conversation",
    "Message",
    "Reply",
    "Scenario",
    "ToolCall",
    "Turn",
    "echo_scenario",
    "parse_turn",
    "weather_scenario",
]

Role = Literal["system", "user", "assistant", "tool"]
Turn = Mapping[str, Any]


@dataclass
class ToolCall:
    """A function call the model makes: `arguments` is JSON text, as on the wire."""

    id: str
    name: str
    arguments: str = "{}"

    def args(self) -> dict[str, Any]:
        """The arguments parsed; `{}` when they are not a JSON object."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class Message:
    """One normalized message. Tool results have role `tool`, `tool_call_id` and `name`."""

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


@dataclass
class Conversation:
    """Everything the model is shown for one call."""

    model: str
    api: str
    messages: list[Message]
    tools: list[str] = field(default_factory=list)
    tool_choice: Any = None

    def __post_init__(self) -> None:
        # Tool results name their function in no API but Chat's legacy one: resolve the names from
        # the calls so that scenarios can look results up by function name.
        names = {c.id: c.name for m in self.messages for c in m.tool_calls}
        for message in self.messages:
            if message.role == "tool" and message.name is None and message.tool_call_id:
                message.name = names.get(message.tool_call_id)

    @property
    def tools_allowed(self) -> bool:
        """False when `tool_choice` is `"none"`: the model must answer in text."""
        return bool(self.tool_choice != "none")

    def last_user_index(self) -> int:
        """Index of the last user message, -1 when there is none."""
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index].role == "user":
                return index
        return -1

    def last_user_text(self) -> str:
        """The text of the last user message ("" when there is none)."""
        index = self.last_user_index()
        return self.messages[index].content if index >= 0 else ""

    def since_last_user(self) -> list[Message]:
        """The messages after the last user message: this turn's tool calls and results."""
        return self.messages[self.last_user_index() + 1 :]

    def tool_results(self) -> dict[str, str]:
        """Tool outputs of this turn by function name (the latest one wins)."""
        return {m.name: m.content for m in self.since_last_user() if m.role == "tool" and m.name}

    def text(self) -> str:
        """All the text the model sees, for the token estimate."""
        parts: list[str] = []
        for m in self.messages:
            parts.append(m.content)
            parts.extend(c.name + c.arguments for c in m.tool_calls)
        return "".join(parts)

    def prompt_tokens(self) -> int:
        """Estimated prompt tokens."""
        return estimate_tokens(self.text())


@dataclass
class Reply:
    """What the model answers: text, tool calls, or both."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def completion_tokens(self) -> int:
        """Estimated completion tokens."""
        text = (self.content or "") + "".join(c.name + c.arguments for c in self.tool_calls)
        return estimate_tokens(text)


Scenario = Callable[[Conversation], Turn]


def parse_turn(turn: Turn) -> Reply:
    """Validate a scripted turn and build its reply, with fresh tool-call ids.

    Raises `ValueError` with a readable message for a malformed turn.
    """
    if not isinstance(turn, Mapping):
        raise ValueError(f"a turn must be an object, got {type(turn).__name__}")
    unknown = set(turn) - {"content", "tool_calls"}
    if unknown:
        raise ValueError(f"unknown turn keys {sorted(unknown)}: use 'content' and/or 'tool_calls'")
    content = turn.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError("'content' must be a string")
    raw_calls = turn.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise ValueError("'tool_calls' must be a list")
    calls: list[ToolCall] = []
    for index, raw in enumerate(raw_calls):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ValueError(f"tool_calls[{index}] needs a 'name' string")
        arguments = raw.get("arguments", {})
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            text = arguments  # already JSON text (possibly invalid on purpose, to test a worker)
        elif isinstance(arguments, Mapping):
            text = dumps_compact(dict(arguments))
        else:
            raise ValueError(f"tool_calls[{index}].arguments must be an object or a JSON string")
        call_id = raw.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ValueError(f"tool_calls[{index}].id must be a string")
        calls.append(ToolCall(id=call_id or new_id("call"), name=raw["name"], arguments=text))
    if content is None and not calls:
        raise ValueError("a turn needs 'content' or at least one tool call")
    return Reply(content=content, tool_calls=calls)


def echo_scenario(conversation: Conversation) -> Turn:
    """Answer `You said: <last user message>`."""
    return {"content": f"You said: {conversation.last_user_text()}"}


_FAVORITE_CITY = "getUserFavoriteCity"
_NICKNAME = "getCityNickname"
_WEATHER = "getWeatherAtLocation"


def _plain(output: str) -> str:
    """A tool output as a phrase: JSON strings unwrapped, objects reduced to their main value."""
    text = output.strip()
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    if isinstance(value, dict):
        for key in ("result", "value", "city", "location", "nickname", "weather", "output"):
            if isinstance(value.get(key), str | int | float):
                value = value[key]
                break
        else:
            value = dumps_compact(value)
    return str(value).strip().rstrip(".")


def weather_scenario(conversation: Conversation) -> Turn:
    """The OpenAI Assistants function-calling sample: favourite city, then nickname and weather.

    User question → `getUserFavoriteCity()`; its result → two parallel calls
    `getCityNickname(location)` and `getWeatherAtLocation(location)`; both results → the answer
    built from the outputs, e.g. "The weather in The Emerald City (Seattle, WA) is currently
    70 degrees and sunny.". A tool the request does not offer is not called (as a real model).
    """
    if not conversation.tools_allowed:
        return {"content": "I can't check the weather without calling my tools."}
    results = conversation.tool_results()
    offered = set(conversation.tools)

    def missing(*names: str) -> Turn | None:
        absent = [n for n in names if n not in offered]
        if absent:
            return {"content": f"I can't check the weather: no tool named {', '.join(absent)}."}
        return None

    if _FAVORITE_CITY not in results:
        return missing(_FAVORITE_CITY) or {"tool_calls": [{"name": _FAVORITE_CITY}]}
    city = _plain(results[_FAVORITE_CITY])
    wanted = [n for n in (_NICKNAME, _WEATHER) if n not in results]
    if wanted:
        return missing(*wanted) or {
            "tool_calls": [{"name": n, "arguments": {"location": city}} for n in wanted]
        }
    nickname = _plain(results[_NICKNAME])
    weather = _plain(results[_WEATHER])
    return {"content": f"The weather in {nickname} ({city}) is currently {weather}."}


SCENARIOS: dict[str, Scenario] = {"echo": echo_scenario, "weather": weather_scenario}


class Brain:
    """Scripts and scenarios; thread-safe (tests script it from another thread)."""

    def __init__(self, default: str | Scenario = "echo") -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Turn]] = {}
        self._initial_default = default
        self._default: Scenario = _scenario(default)

    def script(self, model: str, turns: Iterable[Turn]) -> int:
        """Queue turns for `model` (`"*"`: any model without its own queue); returns the count.

        Every turn is validated first, so a bad script raises `ValueError` and queues nothing.
        """
        checked = list(turns)
        for turn in checked:
            parse_turn(turn)
        with self._lock:
            self._scripts.setdefault(model, deque()).extend(checked)
        return len(checked)

    def pending(self, model: str | None = None) -> int:
        """Scripted turns not used yet, for one model or all."""
        with self._lock:
            if model is not None:
                return len(self._scripts.get(model, ()))
            return sum(len(q) for q in self._scripts.values())

    def set_default(self, scenario: str | Scenario) -> None:
        """The scenario for models whose name picks none (`"echo"`, `"weather"` or a callable)."""
        resolved = _scenario(scenario)
        with self._lock:
            self._default = resolved

    def reset(self) -> None:
        """Drop every script and restore the default scenario given at construction."""
        with self._lock:
            self._scripts.clear()
            self._default = _scenario(self._initial_default)

    def decide(self, conversation: Conversation) -> Reply:
        """The model's reply to `conversation` (consumes one scripted turn when there is one)."""
        with self._lock:
            turn: Turn | None = None
            for key in (conversation.model, "*"):
                queue = self._scripts.get(key)
                if queue:
                    turn = queue.popleft()
                    break
            default = self._default
        if turn is None:
            turn = _scenario_for_model(conversation.model, default)(conversation)
        return parse_turn(turn)


def _scenario(scenario: str | Scenario) -> Scenario:
    if isinstance(scenario, str):
        try:
            return SCENARIOS[scenario]
        except KeyError:
            raise ValueError(
                f"unknown scenario {scenario!r}; known: {', '.join(sorted(SCENARIOS))}"
            ) from None
    if not callable(scenario):
        raise ValueError("a scenario is a name or a callable")
    return scenario


def _scenario_for_model(model: str, default: Scenario) -> Scenario:
    lowered = model.lower()
    for name, scenario in SCENARIOS.items():
        if name in lowered:
            return scenario
    return default
