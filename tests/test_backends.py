"""The ``responses`` and ``assistants`` backends against the fake OpenAI server, over real HTTP.

The real openai client comes from ``ModelClients`` (as in the worker); a small loop plays the
worker's role: it calls ``begin``/``poll``, merges handles as the run state machine does, copies
the chat-level ids as the step handler does, runs the tools with canned outputs and appends the
messages, then builds the next ``TurnRequest`` from the history (``last_tool_outputs``, as the
step handler). Sync tests, each bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
import pytest

from handlers.step import REMOTE_KEYS, last_tool_outputs
from worker.backends.assistants import AssistantsBackend
from worker.backends.base import Backend, ModelError, TurnRequest
from worker.backends.clients import ModelClients
from worker.backends.responses import ResponsesBackend
from worker.config.settings import Settings
from worker.runs.history import ModelMessage, ToolCallRef
from worker.runs.model import ModelTurn, Pending
from worker.testing import FakeOpenAI, RecordedRequest

T = TypeVar("T")

DELAY = 0.05  # background delay of the fake: how long a response or a run "thinks"
TIMEOUT = 8.0  # bound of every test's model interactions
WEATHER_MODEL = "gpt-4o-weather"
ECHO_MODEL = "gpt-4o"
WEATHER_OUTPUTS = {
    "getUserFavoriteCity": "Seattle, WA",
    "getCityNickname": "The Emerald City",
    "getWeatherAtLocation": "70 degrees and sunny",
}
WEATHER_ANSWER = "The weather in The Emerald City (Seattle, WA) is currently 70 degrees and sunny."
QUESTION = "What's the weather in my favorite city?"
SYSTEM = "You are a weather bot."
TOOLS: tuple[dict[str, Any], ...] = tuple(
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} (test)",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
    for name in WEATHER_OUTPUTS
)


# -- the worker's role --------------------------------------------------------------------------


@dataclass
class Chat:
    """A chat as the worker keeps it: messages, chat-level remote ids."""

    messages: list[ModelMessage]
    remote: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """How a run ended in ``drive``: its final turn (or ending), every turn, and its handle."""

    final: ModelTurn | Pending
    turns: list[ModelTurn]
    handle: dict[str, Any]


def request_for(
    chat: Chat,
    *,
    run_id: str,
    handle: dict[str, Any],
    model: str = WEATHER_MODEL,
    **fields: Any,
) -> TurnRequest:
    """The TurnRequest the step handler would build from this chat and run."""
    user_message = next((m.content for m in reversed(chat.messages) if m.role == "user"), "")
    arguments: dict[str, Any] = {"tools": TOOLS, "user_message": user_message, **fields}
    return TurnRequest(
        chat_id="chat-1",
        run_id=run_id,
        model=model,
        messages=tuple(chat.messages),
        handle=dict(handle),
        remote=dict(chat.remote),
        tool_outputs=last_tool_outputs(chat.messages),
        **arguments,
    )


async def drive(
    backend: Backend,
    chat: Chat,
    *,
    run_id: str = "run-1",
    handle: dict[str, Any] | None = None,
    phase: str = "model",
    max_steps: int = 60,
    **fields: Any,
) -> Outcome:
    """Run one worker run to its end: begin/poll, local tools, merged handles."""
    handle = dict(handle or {})
    turns: list[ModelTurn] = []
    for _ in range(max_steps):
        request = request_for(chat, run_id=run_id, handle=handle, **fields)
        result = await (backend.begin(request) if phase == "model" else backend.poll(request))
        handle = {**handle, **result.handle}  # machine.on_turn / on_pending
        chat.remote.update({k: v for k, v in result.handle.items() if k in REMOTE_KEYS})
        if isinstance(result, Pending):
            if result.ended is not None:
                return Outcome(result, turns, handle)
            phase = "poll"
            await asyncio.sleep(DELAY / 3)  # the WORKER_POLL_BACKOFF delay, shortened
            continue
        turns.append(result)
        chat.messages.append(
            ModelMessage("assistant", result.content or "", tool_calls=result.tool_calls)
        )
        if not result.tool_calls:
            return Outcome(result, turns, handle)
        chat.messages.extend(
            ModelMessage("tool", WEATHER_OUTPUTS.get(call.name, "ok"), tool_call_id=call.id)
            for call in result.tool_calls
        )
        phase = "model"
    raise AssertionError(f"the run did not end within {max_steps} steps")


def run_with(settings: Settings, body: Callable[[ModelClients], Awaitable[T]]) -> T:
    """Run ``body`` with fresh clients (closed after), bounded by TIMEOUT."""

    async def main() -> T:
        clients = ModelClients(settings)
        try:
            return await asyncio.wait_for(body(clients), TIMEOUT)
        finally:
            await clients.close()

    return asyncio.run(main())


def openai_settings(fake: FakeOpenAI) -> Settings:
    return Settings.from_env({"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-test"})


def weather_chat() -> Chat:
    return Chat([ModelMessage("system", SYSTEM), ModelMessage("user", QUESTION)])


def bodies(fake: FakeOpenAI, endpoint: str) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.endpoint == endpoint and r.status == 200]


def refused(fake: FakeOpenAI) -> list[RecordedRequest]:
    return [r for r in fake.requests if r.status is not None and r.status >= 400]


def assert_weather_turns(outcome: Outcome) -> None:
    final = outcome.final
    assert isinstance(final, ModelTurn)
    assert final.content == WEATHER_ANSWER
    rounds = [sorted(c.name for c in turn.tool_calls) for turn in outcome.turns[:-1]]
    assert rounds == [["getUserFavoriteCity"], ["getCityNickname", "getWeatherAtLocation"]]
    parallel = outcome.turns[1].tool_calls
    assert all(json.loads(c.arguments) == {"location": "Seattle, WA"} for c in parallel)
    assert len({c.id for c in parallel}) == 2


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay=DELAY).running_in_thread() as server:
        yield server


# -- responses ----------------------------------------------------------------------------------


def test_responses_weather_flow_background_chained(fake: FakeOpenAI) -> None:
    chat = weather_chat()
    outcome = run_with(
        openai_settings(fake),
        lambda clients: drive(ResponsesBackend(clients), chat, instructions="Be brief."),
    )

    assert_weather_turns(outcome)
    final = outcome.final
    assert isinstance(final, ModelTurn)
    assert final.usage.total_tokens > 0
    assert final.handle["responseId"] == outcome.handle["responseId"]
    assert refused(fake) == []  # every function call was answered: no 400 anywhere
    creates = bodies(fake, "responses.create")
    assert len(creates) == 3
    assert all(b["background"] is True and b["store"] is True for b in creates)
    assert all(b["instructions"] == "Be brief." for b in creates)  # not chained: re-sent
    first, *follow_ups = creates
    assert "previous_response_id" not in first
    assert first["input"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
    ]
    assert first["tools"][0] == {
        "type": "function",
        "name": "getUserFavoriteCity",
        "description": "getUserFavoriteCity (test)",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        "strict": False,
    }
    # Each follow-up chains to the previous response and answers exactly its calls.
    response_ids = [t.handle["responseId"] for t in outcome.turns]
    for body, previous, turn in zip(follow_ups, response_ids, outcome.turns, strict=False):
        assert body["previous_response_id"] == previous
        assert [i["type"] for i in body["input"]] == ["function_call_output"] * len(turn.tool_calls)
        assert {i["call_id"] for i in body["input"]} == {c.id for c in turn.tool_calls}
    assert fake.calls(endpoint="responses.retrieve") >= 3


def test_responses_history_with_tool_rounds_as_input_items(fake: FakeOpenAI) -> None:
    call = ToolCallRef("call_old", "getUserFavoriteCity", "{}")
    chat = Chat(
        [
            ModelMessage("system", SYSTEM),
            ModelMessage("user", "first question"),
            ModelMessage("assistant", "Let me check.", tool_calls=(call,)),
            ModelMessage("tool", "Seattle, WA", tool_call_id="call_old"),
            ModelMessage("assistant", "It is Seattle."),
            ModelMessage("user", "second question"),
        ]
    )
    outcome = run_with(
        openai_settings(fake),
        lambda clients: drive(ResponsesBackend(clients), chat, model=ECHO_MODEL),
    )

    assert isinstance(outcome.final, ModelTurn)
    assert outcome.final.content == "You said: second question"
    assert refused(fake) == []
    (body,) = bodies(fake, "responses.create")
    assert body["input"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Let me check."},
        {
            "type": "function_call",
            "call_id": "call_old",
            "name": "getUserFavoriteCity",
            "arguments": "{}",
        },
        {"type": "function_call_output", "call_id": "call_old", "output": "Seattle, WA"},
        {"role": "assistant", "content": "It is Seattle."},
        {"role": "user", "content": "second question"},
    ]


def test_responses_hosted_tools_and_sampling(fake: FakeOpenAI) -> None:
    hosted = (
        {"type": "file_search", "vectorStoreIds": ["vs_1", "vs_2"]},
        {"type": "code_interpreter", "fileIds": ["file_1"]},
    )
    chat = weather_chat()
    outcome = run_with(
        openai_settings(fake),
        lambda clients: drive(
            ResponsesBackend(clients),
            chat,
            model=ECHO_MODEL,
            hosted_tools=hosted,
            temperature=0.2,
            top_p=0.9,
            max_tokens=300,
            reasoning_effort="low",
            tool_choice={"type": "function", "function": {"name": "getCityNickname"}},
        ),
    )

    assert isinstance(outcome.final, ModelTurn)
    (body,) = bodies(fake, "responses.create")
    assert body["tools"][3:] == [
        {"type": "file_search", "vector_store_ids": ["vs_1", "vs_2"]},
        {"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file_1"]}},
    ]
    assert body["tool_choice"] == {"type": "function", "name": "getCityNickname"}
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (0.2, 0.9, 300)
    assert body["reasoning"] == {"effort": "low"}


def test_responses_reasoning_model_gets_no_temperature(fake: FakeOpenAI) -> None:
    chat = weather_chat()
    run_with(
        openai_settings(fake),
        lambda clients: drive(
            ResponsesBackend(clients),
            chat,
            model=ECHO_MODEL,
            temperature=0.2,
            top_p=0.5,
            is_reasoning_model=True,
            max_tokens=100,
        ),
    )
    (body,) = bodies(fake, "responses.create")
    assert "temperature" not in body and "top_p" not in body
    assert body["max_output_tokens"] == 100


def test_responses_rate_limit_is_transient_with_retry_after(fake: FakeOpenAI) -> None:
    # Two: the SDK retries once by itself (SDK_MAX_RETRIES), honouring the Retry-After.
    fake.fault("429", count=2, retry_after=0.25, endpoint="responses.create")
    backend_error: list[ModelError] = []

    async def body(clients: ModelClients) -> None:
        with pytest.raises(ModelError) as caught:
            await ResponsesBackend(clients).begin(
                request_for(weather_chat(), run_id="r", handle={})
            )
        backend_error.append(caught.value)

    run_with(openai_settings(fake), body)
    error = backend_error[0]
    assert error.transient is True
    assert error.retry_after == pytest.approx(0.25)
    assert "429" in error.message


def test_responses_poll_errors_transient_and_permanent(fake: FakeOpenAI) -> None:
    errors: list[ModelError] = []

    async def body(clients: ModelClients) -> None:
        backend = ResponsesBackend(clients)
        pending = await backend.begin(request_for(weather_chat(), run_id="r", handle={}))
        assert isinstance(pending, Pending) and pending.ended is None
        fake.fault("500", count=2, endpoint="responses.retrieve")
        with pytest.raises(ModelError) as caught:
            await backend.poll(request_for(weather_chat(), run_id="r", handle=pending.handle))
        errors.append(caught.value)
        with pytest.raises(ModelError) as caught:
            gone = {"responseId": "resp_doesnotexist"}
            await backend.poll(request_for(weather_chat(), run_id="r", handle=gone))
        errors.append(caught.value)
        with pytest.raises(ModelError) as caught:
            await backend.poll(request_for(weather_chat(), run_id="r", handle={}))
        errors.append(caught.value)

    run_with(openai_settings(fake), body)
    assert [e.transient for e in errors] == [True, False, False]


def test_responses_cancelled_response_ends_the_run(fake: FakeOpenAI) -> None:
    fake.background_delay = 2.0
    results: list[ModelTurn | Pending] = []

    async def body(clients: ModelClients) -> None:
        backend = ResponsesBackend(clients)
        pending = await backend.begin(request_for(weather_chat(), run_id="r", handle={}))
        assert isinstance(pending, Pending)
        await clients.client().responses.cancel(pending.handle["responseId"])
        results.append(
            await backend.poll(request_for(weather_chat(), run_id="r", handle=pending.handle))
        )

    run_with(openai_settings(fake), body)
    (ended,) = results
    assert isinstance(ended, Pending)
    assert ended.ended == "cancelled"
    assert ended.error and "cancelled" in ended.error


def test_responses_missing_previous_response_falls_back_to_history(fake: FakeOpenAI) -> None:
    chat = weather_chat()
    call = ToolCallRef("call_1", "getUserFavoriteCity", "{}")
    chat.messages += [
        ModelMessage("assistant", "", tool_calls=(call,)),
        ModelMessage("tool", "Seattle, WA", tool_call_id="call_1"),
    ]
    handle = {"responseId": "resp_expiredlongago", "callIds": ["call_1"]}
    outcome = run_with(
        openai_settings(fake),
        lambda clients: drive(ResponsesBackend(clients), chat, handle=handle),
    )

    assert isinstance(outcome.final, ModelTurn)
    assert outcome.final.content == WEATHER_ANSWER
    creates = [r for r in fake.requests if r.endpoint == "responses.create"]
    assert creates[0].status == 400  # the chained attempt
    assert creates[1].status == 200 and "previous_response_id" not in creates[1].json
    assert creates[1].json["input"][-1] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": "Seattle, WA",
    }


def test_responses_outputs_for_other_calls_are_not_chained(fake: FakeOpenAI) -> None:
    # The handle's response asked for other calls: chaining would be a 400, the history is not.
    chat = weather_chat()
    call = ToolCallRef("call_1", "getUserFavoriteCity", "{}")
    chat.messages += [
        ModelMessage("assistant", "", tool_calls=(call,)),
        ModelMessage("tool", "Seattle, WA", tool_call_id="call_1"),
    ]
    handle = {"responseId": "resp_x", "callIds": ["call_other"]}
    outcome = run_with(
        openai_settings(fake),
        lambda clients: drive(ResponsesBackend(clients), chat, handle=handle),
    )
    assert isinstance(outcome.final, ModelTurn) and outcome.final.content == WEATHER_ANSWER
    assert refused(fake) == []


def test_responses_on_azure_v1_endpoint(fake: FakeOpenAI) -> None:
    settings = Settings.from_env({"AZURE_OPENAI_ENDPOINT": fake.url, "AZURE_OPENAI_API_KEY": "k"})
    chat = weather_chat()
    outcome = run_with(settings, lambda clients: drive(ResponsesBackend(clients), chat))

    assert_weather_turns(outcome)
    paths = {r.path for r in fake.requests}
    assert "/openai/v1/responses" in paths
    assert all(p.startswith("/openai/v1/responses") for p in paths)
    assert all(r.had_auth for r in fake.requests)
    assert refused(fake) == []


def test_responses_carry_where_their_run_lives_and_are_located(fake: FakeOpenAI) -> None:
    """Every background response names its chat, table, storage setting and run in metadata;
    ``locate`` finds them without a call for a response this backend created, from the API
    for one it did not (another replica's), and not at all for an unknown or foreign one."""
    chat = weather_chat()

    async def body(clients: ModelClients) -> None:
        backend = ResponsesBackend(clients)
        outcome = await drive(backend, chat, collection="ChatsX", storage_setting="Other")
        creates = bodies(fake, "responses.create")
        assert len(creates) == 3
        expected = {
            "chatId": "chat-1",
            "collectionName": "ChatsX",
            "chatStorageConnectionSetting": "Other",
            "runId": "run-1",
        }
        assert all(b["metadata"] == expected for b in creates)
        polls = fake.calls(endpoint="responses.retrieve")
        created = [turn.handle["responseId"] for turn in outcome.turns]
        assert len(set(created)) == 3
        assert await backend.locate(created[0]) == expected
        assert fake.calls(endpoint="responses.retrieve") == polls  # remembered: no call

        other = ResponsesBackend(clients)  # another replica: it asks the API
        assert await other.locate(created[-1]) == expected
        assert fake.calls(endpoint="responses.retrieve") == polls + 1
        assert await other.locate("resp_unknown") is None
        foreign = await clients.client().responses.create(
            model=ECHO_MODEL, input="hi", background=True, store=True, metadata={"app": "x"}
        )
        assert await other.locate(foreign.id) is None

    run_with(openai_settings(fake), body)


REASONING_MODEL = "o-reasoner-weather"


def reasoning_inputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in body["input"] if item.get("type") == "reasoning"]


def test_responses_reasoning_is_chained_or_sent_back_with_the_tool_outputs(
    fake: FakeOpenAI,
) -> None:
    """A reasoning model's tool rounds: every create asks for the encrypted reasoning; a
    follow-up chained by previous_response_id sends none (the service has it); when the chain
    is broken (the previous response is gone), the whole history goes with each of this run's
    rounds' reasoning items, encrypted content included, just before the calls they led to."""
    chat = weather_chat()

    async def body(clients: ModelClients) -> None:
        backend = ResponsesBackend(clients)
        outcome = await drive(backend, chat, model=REASONING_MODEL)
        assert_weather_turns(outcome)
        creates = bodies(fake, "responses.create")
        assert all(b["include"] == ["reasoning.encrypted_content"] for b in creates)
        assert all(reasoning_inputs(b) == [] for b in creates[1:])
        assert all("previous_response_id" in b for b in creates[1:])
        rounds = outcome.handle["reasoning"]
        assert [len(r["callIds"]) for r in rounds] == [1, 2]
        assert all(r["items"][0]["encrypted_content"] for r in rounds)

        # The same run again from its second tool round, its previous response gone.
        previous = outcome.turns[1].handle["responseId"]
        await clients.client().responses.delete(previous)
        seen = len(fake.requests)
        broken = Chat(list(chat.messages[:-1]))  # without the final answer
        handle = {**outcome.turns[1].handle, "reasoning": rounds}
        again = await drive(backend, broken, model=REASONING_MODEL, handle=handle)
        assert isinstance(again.final, ModelTurn) and again.final.content == WEATHER_ANSWER
        later = fake.requests[seen:]
        chained, whole = [r for r in later if r.endpoint == "responses.create"]
        assert chained.status == 400  # previous_response_not_found
        assert whole.status == 200 and "previous_response_id" not in whole.json
        items = whole.json["input"]
        kinds = [item.get("type", "message") for item in items]
        assert kinds == [
            "message",
            "message",
            "reasoning",
            "function_call",
            "function_call_output",
            "reasoning",
            "function_call",
            "function_call",
            "function_call_output",
            "function_call_output",
        ]
        sent = reasoning_inputs(whole.json)
        assert sent == [r["items"][0] for r in rounds]  # accepted by the fake: authentic

    run_with(openai_settings(fake), body)


def test_responses_without_include_support_still_run(fake: FakeOpenAI) -> None:
    """A service that refuses ``include`` is asked again without it, and not asked again."""
    fake.include_supported = False
    chat = weather_chat()
    outcome = run_with(
        openai_settings(fake), lambda clients: drive(ResponsesBackend(clients), chat)
    )
    assert_weather_turns(outcome)
    creates = [r for r in fake.requests if r.endpoint == "responses.create"]
    assert [r.status for r in creates] == [400, 200, 200, 200]
    assert [("include" in r.json) for r in creates] == [True, False, False, False]


# -- assistants ---------------------------------------------------------------------------------


def thread_messages(fake: FakeOpenAI, thread_id: str) -> list[Any]:
    """The thread's messages, oldest first (through the SDK, its warning silenced)."""
    with (
        warnings.catch_warnings(),
        openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(client.beta.threads.messages.list(thread_id, order="asc", limit=100).data)


def texts(messages: list[Any]) -> list[tuple[str, str]]:
    return [(m.role, m.content[0].text.value) for m in messages]


def test_assistants_weather_flow(fake: FakeOpenAI) -> None:
    chat = weather_chat()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run_with(
            openai_settings(fake),
            lambda clients: drive(AssistantsBackend(clients), chat, instructions="Be brief."),
        )

    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert_weather_turns(outcome)
    final = outcome.final
    assert isinstance(final, ModelTurn) and final.usage.total_tokens > 0
    assert set(chat.remote) == {"assistantId", "threadId"}
    assert outcome.handle["remoteRunId"].startswith("run_")
    assert refused(fake) == []
    (assistant,) = [r.json for r in fake.requests if r.path == "/v1/assistants"]
    assert assistant["model"] == WEATHER_MODEL
    assert assistant["instructions"] == SYSTEM
    assert [t["function"]["name"] for t in assistant["tools"]] == list(WEATHER_OUTPUTS)
    (thread,) = [r.json for r in fake.requests if r.path == "/v1/threads"]
    assert thread["messages"] == []  # nothing earlier than this run's message
    (run,) = bodies(fake, "runs.create")
    assert run["assistant_id"] == chat.remote["assistantId"]
    assert run["additional_instructions"] == "Be brief."
    assert run["metadata"]["runId"] == "run-1"
    assert len(bodies(fake, "runs.submit")) == 2
    assert texts(thread_messages(fake, chat.remote["threadId"])) == [
        ("user", QUESTION),
        ("assistant", WEATHER_ANSWER),
    ]


def test_assistants_thread_seeded_then_reused_by_the_next_run(fake: FakeOpenAI) -> None:
    call = ToolCallRef("call_old", "getUserFavoriteCity", "{}")
    chat = Chat(
        [
            ModelMessage("system", SYSTEM),
            ModelMessage("user", "Hi"),
            ModelMessage("assistant", "", tool_calls=(call,)),
            ModelMessage("tool", "Seattle, WA", tool_call_id="call_old"),
            ModelMessage("assistant", "Hello from Seattle!"),
            ModelMessage("user", "How are you?"),
        ]
    )
    hosted = (
        {"type": "file_search", "vectorStoreIds": ["vs_1"]},
        {"type": "code_interpreter", "fileIds": ["file_1"]},
    )

    async def body(clients: ModelClients) -> list[Outcome]:
        backend = AssistantsBackend(clients)
        first = await drive(backend, chat, model=ECHO_MODEL, hosted_tools=hosted)
        chat.messages.append(ModelMessage("user", "And now?"))
        second = await drive(backend, chat, run_id="run-2", model=ECHO_MODEL, hosted_tools=hosted)
        return [first, second]

    first, second = run_with(openai_settings(fake), body)

    assert [o.final.content for o in (first, second) if isinstance(o.final, ModelTurn)] == [
        "You said: How are you?",
        "You said: And now?",
    ]
    assert len([r for r in fake.requests if r.path == "/v1/assistants"]) == 1
    (thread,) = [r.json for r in fake.requests if r.path == "/v1/threads"]
    assert thread["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello from Seattle!"},
    ]
    (assistant,) = [r.json for r in fake.requests if r.path == "/v1/assistants"]
    assert assistant["tools"][3:] == [{"type": "file_search"}, {"type": "code_interpreter"}]
    assert assistant["tool_resources"] == {
        "file_search": {"vector_store_ids": ["vs_1"]},
        "code_interpreter": {"file_ids": ["file_1"]},
    }
    messages = thread_messages(fake, chat.remote["threadId"])
    assert texts(messages) == [
        ("user", "Hi"),
        ("assistant", "Hello from Seattle!"),
        ("user", "How are you?"),
        ("assistant", "You said: How are you?"),
        ("user", "And now?"),
        ("assistant", "You said: And now?"),
    ]
    assert [m.metadata.get("runId") for m in messages if m.role == "user"] == [
        None,
        "run-1",
        "run-2",
    ]


def test_assistants_thread_gone_remotely_is_replaced(fake: FakeOpenAI) -> None:
    chat = Chat(
        [
            ModelMessage("system", SYSTEM),
            ModelMessage("user", "Hi"),
            ModelMessage("assistant", "Hello!"),
            ModelMessage("user", "Still there?"),
        ],
        remote={"threadId": "thread_deletedlongago"},
    )
    outcome = run_with(
        openai_settings(fake),
        lambda clients: drive(AssistantsBackend(clients), chat, model=ECHO_MODEL),
    )

    assert isinstance(outcome.final, ModelTurn)
    assert outcome.final.content == "You said: Still there?"
    assert chat.remote["threadId"] != "thread_deletedlongago"
    assert texts(thread_messages(fake, chat.remote["threadId"])) == [
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Still there?"),
        ("assistant", "You said: Still there?"),
    ]


def test_assistants_repeated_begin_adds_the_message_once(fake: FakeOpenAI) -> None:
    chat = weather_chat()

    async def body(clients: ModelClients) -> list[ModelTurn | Pending]:
        backend = AssistantsBackend(clients)
        fake.background_delay = 5.0  # the remote run keeps "thinking" until told otherwise
        first = await backend.begin(request_for(chat, run_id="run-1", handle={}))
        chat.remote.update({k: v for k, v in first.handle.items() if k in REMOTE_KEYS})
        # The step's commit was lost: the same step (same empty handle) is delivered again.
        again = await backend.begin(request_for(chat, run_id="run-1", handle={}))
        fake.background_delay = DELAY
        await asyncio.sleep(DELAY * 2)  # the remote run has answered now
        # Later still (the remote run already asked for tools): the same again.
        late = await backend.begin(request_for(chat, run_id="run-1", handle={}))
        return [first, again, late]

    first, again, late = run_with(openai_settings(fake), body)

    assert isinstance(first, Pending) and isinstance(again, Pending)
    assert again.handle["remoteRunId"] == first.handle["remoteRunId"]
    assert isinstance(late, ModelTurn)  # adopted: the run's requires_action, as a poll sees it
    assert [c.name for c in late.tool_calls] == ["getUserFavoriteCity"]
    assert late.handle["remoteRunId"] == first.handle["remoteRunId"]
    assert len(bodies(fake, "runs.create")) == 1
    assert texts(thread_messages(fake, chat.remote["threadId"])) == [("user", QUESTION)]


def test_assistants_transient_failure_after_creating_keeps_the_ids(fake: FakeOpenAI) -> None:
    fake.fault("429", count=1, retry_after=0.05, endpoint="runs.create")
    chat = weather_chat()

    async def body(clients: ModelClients) -> tuple[ModelTurn | Pending, Outcome]:
        backend = AssistantsBackend(clients)
        pending = await backend.begin(request_for(chat, run_id="run-1", handle={}))
        chat.remote.update({k: v for k, v in pending.handle.items() if k in REMOTE_KEYS})
        # The worker polls the pending handle; the poll starts the run.
        rest = await drive(backend, chat, handle=pending.handle, phase="poll")
        return pending, rest

    pending, rest = run_with(openai_settings(fake), body)

    assert isinstance(pending, Pending) and pending.ended is None
    assert set(pending.handle) == {"assistantId", "threadId"}
    assert_weather_turns(rest)
    assert len([r for r in fake.requests if r.path == "/v1/assistants"]) == 1
    assert len([r for r in fake.requests if r.path == "/v1/threads"]) == 1
    assert texts(thread_messages(fake, chat.remote["threadId"])) == [
        ("user", QUESTION),
        ("assistant", WEATHER_ANSWER),
    ]


def test_assistants_repeated_tool_outputs_are_not_a_failure(fake: FakeOpenAI) -> None:
    chat = weather_chat()

    async def body(clients: ModelClients) -> tuple[ModelTurn | Pending, Outcome]:
        backend = AssistantsBackend(clients)
        handle: dict[str, Any] = {}
        result: ModelTurn | Pending = await backend.begin(
            request_for(chat, run_id="run-1", handle=handle)
        )
        for _ in range(50):
            handle = {**handle, **result.handle}
            chat.remote.update({k: v for k, v in result.handle.items() if k in REMOTE_KEYS})
            if isinstance(result, ModelTurn):
                break
            await asyncio.sleep(DELAY / 3)
            result = await backend.poll(request_for(chat, run_id="run-1", handle=handle))
        assert isinstance(result, ModelTurn) and result.tool_calls
        chat.messages.append(ModelMessage("assistant", "", tool_calls=result.tool_calls))
        chat.messages.extend(
            ModelMessage("tool", WEATHER_OUTPUTS[c.name], tool_call_id=c.id)
            for c in result.tool_calls
        )
        submitted = await backend.begin(request_for(chat, run_id="run-1", handle=handle))
        assert isinstance(submitted, Pending)
        # Redelivered: the same outputs again; the remote run already took them.
        again = await backend.begin(request_for(chat, run_id="run-1", handle=handle))
        rest = await drive(backend, chat, handle={**handle, **again.handle}, phase="poll")
        return again, rest

    again, rest = run_with(openai_settings(fake), body)

    assert isinstance(again, Pending) and again.ended is None
    assert isinstance(rest.final, ModelTurn) and rest.final.content == WEATHER_ANSWER
    submits = [r for r in fake.requests if r.endpoint == "runs.submit"]
    assert [r.status for r in submits] == [200, 400, 200]  # the repeat refused, and absorbed


def test_assistants_expired_run_ends_the_worker_run(fake: FakeOpenAI) -> None:
    fake.background_delay = 1.0  # the model never answers before the run expires
    fake.run_expiry = 0.1
    chat = weather_chat()
    outcome = run_with(
        openai_settings(fake), lambda clients: drive(AssistantsBackend(clients), chat)
    )

    final = outcome.final
    assert isinstance(final, Pending)
    assert final.ended == "expired"
    assert final.error and "expired" in final.error
    assert final.handle["remoteRunId"] and final.handle["threadId"]


def test_assistants_older_active_run_is_cancelled_first(fake: FakeOpenAI) -> None:
    fake.background_delay = 0.5
    chat = weather_chat()

    async def body(clients: ModelClients) -> tuple[ModelTurn | Pending, Outcome]:
        backend = AssistantsBackend(clients)
        stale = await backend.begin(request_for(chat, run_id="run-1", handle={}))
        chat.remote.update({k: v for k, v in stale.handle.items() if k in REMOTE_KEYS})
        # The worker gave up on run-1 (its own timeout); run-2 starts on the same thread.
        fake.background_delay = DELAY
        chat.messages.append(ModelMessage("user", "Anyone there?"))
        second = await drive(backend, chat, run_id="run-2", model=ECHO_MODEL)
        return stale, second

    stale, second = run_with(openai_settings(fake), body)

    assert isinstance(second.final, ModelTurn)
    assert second.final.content == "You said: Anyone there?"
    cancels = [r for r in fake.requests if r.path.endswith("/cancel")]
    assert len(cancels) == 1 and stale.handle["remoteRunId"] in cancels[0].path
    assert refused(fake) == []


def test_assistants_rate_limited_poll_is_transient(fake: FakeOpenAI) -> None:
    errors: list[ModelError] = []

    async def body(clients: ModelClients) -> None:
        backend = AssistantsBackend(clients)
        chat = weather_chat()
        pending = await backend.begin(request_for(chat, run_id="run-1", handle={}))
        fake.fault("429", count=2, retry_after=0.2, endpoint="runs.retrieve")
        with pytest.raises(ModelError) as caught:
            await backend.poll(request_for(chat, run_id="run-1", handle=pending.handle))
        errors.append(caught.value)

    run_with(openai_settings(fake), body)
    (error,) = errors
    assert error.transient and error.retry_after == pytest.approx(0.2)


def test_assistants_tool_outputs_without_a_remote_run_are_refused(fake: FakeOpenAI) -> None:
    chat = weather_chat()
    call = ToolCallRef("call_1", "getUserFavoriteCity", "{}")
    chat.messages += [
        ModelMessage("assistant", "", tool_calls=(call,)),
        ModelMessage("tool", "Seattle, WA", tool_call_id="call_1"),
    ]

    async def body(clients: ModelClients) -> None:
        with pytest.raises(ModelError) as caught:
            await AssistantsBackend(clients).begin(request_for(chat, run_id="r", handle={}))
        assert caught.value.transient is False

    run_with(openai_settings(fake), body)
    assert fake.requests == []


def test_assistants_two_copies_of_a_first_step_start_one_remote_run(fake: FakeOpenAI) -> None:
    """Two copies of a run's first step start it at the same instant on the chat's thread
    (a duplicated step, a lease lost mid-call). Both see the thread free; the service takes
    one ``runs.create`` and refuses the other with 400 "already has an active run" (the
    fake, as the real API). That is a race, not a failure: the refused copy returns Pending
    and its poll adopts the run the other started. One remote run; both copies follow it to
    the same answer; the user message is in the thread once."""

    async def body(clients: ModelClients) -> tuple[list[ModelTurn | Pending], list[Outcome]]:
        backend = AssistantsBackend(clients)
        chat = weather_chat()
        await drive(backend, chat, model=ECHO_MODEL)  # the chat's assistant and thread
        chat.messages.append(ModelMessage("user", "And now?"))
        # The first runs.create to arrive is held a while, so that the other copy's
        # create lands first and the held one meets a thread with an active run (the
        # remote run keeps "thinking" meanwhile).
        fake.fault("slow", count=1, delay=0.5, endpoint="runs.create")
        fake.background_delay = 30.0
        request = request_for(chat, run_id="run-2", handle={}, model=ECHO_MODEL)
        started = list(await asyncio.gather(backend.begin(request), backend.begin(request)))
        fake.background_delay = DELAY
        followed = []
        for copy in started:
            assert isinstance(copy, Pending) and copy.ended is None
            followed.append(
                await drive(
                    backend,
                    Chat(list(chat.messages), dict(chat.remote)),
                    run_id="run-2",
                    handle=copy.handle,
                    phase="poll",
                    model=ECHO_MODEL,
                )
            )
        return started, followed

    started, followed = run_with(openai_settings(fake), body)

    creates = [r for r in fake.requests if r.endpoint == "runs.create"]
    assert sorted(r.status or 0 for r in creates) == [200, 200, 400]  # run-1; run-2 and its race
    (refused_create,) = [r for r in creates if r.status == 400]
    assert refused_create.fault == "slow"  # the held copy was the one refused
    assert sorted("remoteRunId" in copy.handle for copy in started) == [False, True]
    (winner,) = {copy.handle["remoteRunId"] for copy in started if "remoteRunId" in copy.handle}
    for outcome in followed:
        assert isinstance(outcome.final, ModelTurn)
        assert outcome.final.content == "You said: And now?"
        assert outcome.handle["remoteRunId"] == winner
    thread_id = started[0].handle["threadId"]
    assert texts(thread_messages(fake, thread_id))[-2:] == [
        ("user", "And now?"),
        ("assistant", "You said: And now?"),
    ]
    assert [text for role, text in texts(thread_messages(fake, thread_id))].count("And now?") == 1


def test_a_streamed_chat_answer_is_assembled_from_interleaved_chunks() -> None:
    """Chunks as a server may send them: two tool calls whose pieces interleave, an id and a
    name repeated in later chunks, the halves of a character in two chunks, the usage in a
    last chunk without choices."""
    from openai.types.chat import ChatCompletionChunk

    from worker.backends.chat import StreamedAnswer

    def chunk(
        delta: dict[str, Any], finish: str | None = None, **extra: Any
    ) -> ChatCompletionChunk:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta or finish else []
        return ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": choices, **extra}
        )  # fmt: skip

    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    answer = StreamedAnswer()
    texts = [
        answer.add(chunk({"role": "assistant", "content": ""})),
        answer.add(chunk({"content": "Looking \ud83d"})),
        answer.add(chunk({"content": "\ude00 up."})),
        answer.add(chunk(call(0, id="call_a", type="function", function={"name": "f", "arguments": ""}))),
        answer.add(chunk(call(1, id="call_b", type="function", function={"name": "g", "arguments": '{"y"'}))),
        answer.add(chunk(call(0, id="call_a", function={"name": "f", "arguments": '{"x": '}))),
        answer.add(chunk(call(1, function={"arguments": ": 2}"}))),
        answer.add(chunk(call(0, function={"arguments": "1}"}))),
        answer.add(chunk({}, "tool_calls")),
        answer.add(chunk({}, usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})),
    ]  # fmt: skip
    assert "".join(texts) == "Looking \ud83d\ude00 up."
    turn = answer.turn()
    assert turn.content == "Looking 😀 up."
    assert [(c.id, c.name, c.arguments) for c in turn.tool_calls] == [
        ("call_a", "f", '{"x": 1}'),
        ("call_b", "g", '{"y": 2}'),
    ]
    assert (turn.usage.prompt_tokens, turn.usage.total_tokens) == (9, 13)
    broken = StreamedAnswer()
    broken.add(chunk({"content": "half"}))
    with pytest.raises(ModelError, match="ended before") as failure:
        broken.turn()
    assert failure.value.transient
