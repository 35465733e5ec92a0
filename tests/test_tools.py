"""Function tools: schemas from signatures, the registry, loading modules, running calls."""

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from handlers.tool_calls import ToolCall, ToolResult, run_tool_call, run_tool_calls
from handlers.tools import (
    MIN_TOOL_THREADS,
    ToolLoadError,
    ToolRegistry,
    load_tools,
    tool,
    tool_executor,
    tool_spec,
)
from tests import sample_tools
from tests.sample_tools import echo, fail, find_order, get_weather, nothing, slow, slow_sync
from tests.support.env import StorageEnv, wait_until
from worker.app import open_app

SAMPLES = "tests.sample_tools"


def registry() -> ToolRegistry:
    return ToolRegistry([get_weather, find_order, fail, slow, slow_sync, echo, nothing])


def run(
    *calls: ToolCall, allowed: list[str] | None = None, timeout: float = 5.0
) -> list[ToolResult]:
    return asyncio.run(run_tool_calls(registry(), calls, allowed=allowed, timeout=timeout))


def run_one(name: str, arguments: str, **kwargs: Any) -> ToolResult:
    [result] = run(ToolCall("call_1", name, arguments), **kwargs)
    return result


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(source, encoding="utf-8")


class TestSchema:
    """The spec ``@tool`` derives from a function, and its overrides."""

    def test_bare_decorator_uses_name_docstring_and_signature(self) -> None:
        """Name, cleaned docstring, typed properties, defaults and required come from the function."""
        spec = tool_spec(get_weather)
        assert spec is not None
        assert spec.name == "get_weather"
        assert (
            spec.description == "Get the weather forecast for a city.\n\nReturns one entry per day."
        )
        assert spec.parameters == {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name, e.g. Paris"},
                "days": {"type": "integer", "default": 1},
                "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
            },
            "required": ["city"],
            "additionalProperties": False,
        }

    def test_decorated_function_is_returned_unchanged(self) -> None:
        """The decorator attaches a spec and the function stays callable as before."""
        assert get_weather("Oslo").city == "Oslo"
        assert asyncio.run(find_order(7)) == {"order": 7, "items": []}

    def test_name_and_description_overrides(self) -> None:
        """Explicit name and description win over the function's own."""
        spec = tool_spec(find_order)
        assert spec is not None
        assert (spec.name, spec.description) == ("lookup_order", "Find an order by its number.")
        assert spec.parameters["required"] == ["order_id"]

    def test_explicit_parameters_override_the_signature(self) -> None:
        """Given parameters are used verbatim, and a copy is taken."""
        spec = tool_spec(echo)
        assert spec is not None
        assert spec.parameters == {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        }
        assert spec.arguments_model is None

    def test_no_parameters_gives_an_empty_object_schema(self) -> None:
        """A function without parameters still has an object schema with ``required``."""
        spec = tool_spec(nothing)
        assert spec is not None
        assert spec.parameters == {
            "type": "object",
            "properties": {},
            "required": [],
            "additionalProperties": False,
        }

    def test_any_parameter_name_works_and_titles_are_stripped(self) -> None:
        """Names pydantic reserves are fine, and a property called ``title`` is kept."""

        @tool
        def odd(title: str, model_id: str = "m", json: int = 0, _hidden: bool = False) -> str:
            """Odd names."""
            return title

        spec = tool_spec(odd)
        assert spec is not None
        assert list(spec.parameters["properties"]) == ["title", "model_id", "json", "_hidden"]
        assert "title" not in spec.parameters
        assert spec.parameters["properties"]["title"] == {"type": "string"}

    def test_invalid_name_is_refused_at_decoration(self) -> None:
        """A name OpenAI would reject fails at import time, not at the first call."""
        with pytest.raises(ValueError, match="must match"):
            tool(name="has space")(nothing)

    def test_undescribable_signature_is_refused_at_decoration(self) -> None:
        """A parameter type pydantic cannot describe is a TypeError naming the tool."""

        class Opaque:
            pass

        def uses(value: Opaque) -> None:
            """Takes something opaque."""

        with pytest.raises(TypeError, match="tool 'uses': cannot describe its parameters"):
            tool(uses)


class TestRegistry:
    """Definitions in both API formats, and the allow-list."""

    def test_chat_completions_definitions(self) -> None:
        """Each tool is ``{"type": "function", "function": {name, description, parameters}}``."""
        [definition] = registry().definitions(["get_weather"])
        assert definition["type"] == "function"
        assert definition["function"]["name"] == "get_weather"
        assert definition["function"]["description"].startswith("Get the weather")
        assert definition["function"]["parameters"]["required"] == ["city"]

    def test_responses_definitions(self) -> None:
        """Each tool is flat: ``{"type": "function", name, description, parameters}``."""
        [definition] = registry().responses_definitions(["lookup_order"])
        assert set(definition) == {"type", "name", "description", "parameters"}
        assert definition["name"] == "lookup_order"

    def test_allow_list_filters_in_registration_order(self) -> None:
        """Only allowed, registered names, in registration order; None means all."""
        tools = registry()
        names = [d["function"]["name"] for d in tools.definitions(["fail", "external", "echo"])]
        assert names == ["fail", "echo"]
        assert len(tools.definitions(None)) == len(tools) == 7
        assert tools.definitions([]) == []

    def test_definitions_are_copies(self) -> None:
        """Changing a returned definition does not change the spec."""
        tools = registry()
        tools.definitions()[0]["function"]["parameters"]["properties"].clear()
        assert tools.definitions()[0]["function"]["parameters"]["properties"]

    def test_plain_function_registers_with_defaults(self) -> None:
        """A function without ``@tool`` is described by the defaults."""
        spec = ToolRegistry().register(sample_tools.helper)
        assert spec.name == "helper"
        assert tool_spec(sample_tools.helper) is None

    def test_same_name_twice_is_refused(self) -> None:
        """A second function under a taken name is a ValueError naming both."""
        tools = registry()
        tools.register(get_weather)  # the same function again: harmless

        @tool(name="get_weather")
        def impostor() -> None:
            """Another weather."""

        with pytest.raises(ValueError, match="duplicate tool name 'get_weather'"):
            tools.register(impostor)


class TestLoadTools:
    """Importing ``WORKER_TOOLS`` modules, and the one-line errors that stop the worker."""

    def test_registers_every_decorated_function(self) -> None:
        """All module-level @tool functions, and nothing else."""
        tools = load_tools([SAMPLES, " "])
        assert tools.names() == [
            "get_weather",
            "lookup_order",
            "fail",
            "slow",
            "slow_sync",
            "echo",
            "nothing",
        ]

    def test_missing_module(self) -> None:
        """A module that cannot be found names the module and the cause."""
        with pytest.raises(ToolLoadError) as caught:
            load_tools(["no_such_tools_module"])
        assert str(caught.value) == (
            "cannot import tool module 'no_such_tools_module': "
            "ModuleNotFoundError: No module named 'no_such_tools_module'"
        )

    def test_module_failing_at_import(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Any exception at import becomes a ToolLoadError with its type and message."""
        write_module(tmp_path, "broken_tools_mod", "raise RuntimeError('no config')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(ToolLoadError, match="'broken_tools_mod': RuntimeError: no config"):
            load_tools(["broken_tools_mod"])

    def test_module_without_tools(self) -> None:
        """A module with no @tool function is a configuration mistake."""
        with pytest.raises(ToolLoadError, match="tool module 'string' defines no @tool functions"):
            load_tools(["string"])

    def test_duplicate_names_across_modules(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two modules defining the same tool name cannot both be loaded."""
        source = "from handlers.tools import tool\n\n@tool\ndef fail() -> str:\n    return 'x'\n"
        write_module(tmp_path, "dup_tools_mod", source)
        monkeypatch.syspath_prepend(str(tmp_path))
        try:
            with pytest.raises(ToolLoadError) as caught:
                load_tools([SAMPLES, "dup_tools_mod"])
        finally:
            sys.modules.pop("dup_tools_mod", None)
        message = str(caught.value)
        assert "duplicate tool name 'fail'" in message
        assert "tests.sample_tools.fail" in message and "dup_tools_mod.fail" in message
        assert "\n" not in message


class TestRunToolCalls:
    """Running the model's calls: concurrency, timeouts, and every failure as a result."""

    def test_sync_and_async_results(self) -> None:
        """Strings pass as they are; other values are JSON; results keep the calls' order."""
        results = run(
            ToolCall("a", "lookup_order", '{"order_id": "42", "include_items": true}'),
            ToolCall("b", "get_weather", '{"city": "Oslo", "days": 2}'),
            ToolCall("c", "slow", '{"seconds": 0}'),
            ToolCall("d", "nothing", ""),
        )
        assert [r.call_id for r in results] == ["a", "b", "c", "d"]
        assert all(r.ok for r in results)
        assert json.loads(results[0].output) == {"order": 42, "items": ["book"]}
        assert json.loads(results[1].output) == {"city": "Oslo", "days": 2, "unit": "c"}
        assert results[2].output == "slept 0.0"
        assert results[3].output == "null"

    def test_calls_run_concurrently(self) -> None:
        """Two slow calls (one async, one in a thread) overlap in time."""
        sample_tools.EVENTS.clear()
        results = run(
            ToolCall("a", "slow", '{"seconds": 0.3, "label": "a"}'),
            ToolCall("b", "slow_sync", '{"seconds": 0.3, "label": "b"}'),
        )
        assert all(r.ok for r in results)
        starts = [t for _, kind, t in sample_tools.EVENTS if kind == "start"]
        ends = [t for _, kind, t in sample_tools.EVENTS if kind == "end"]
        assert len(starts) == len(ends) == 2
        assert max(starts) < min(ends)

    def test_each_call_has_its_own_timeout(self) -> None:
        """A slow call times out while a quick one in the same round succeeds."""
        fast, slow_async, slow_thread = run(
            ToolCall("a", "slow", '{"seconds": 0}'),
            ToolCall("b", "slow", '{"seconds": 5}'),
            ToolCall("c", "slow_sync", '{"seconds": 0.3}'),
            timeout=0.1,
        )
        assert fast.ok
        assert slow_async == ToolResult(
            "b", "slow", "error: tool 'slow' timed out after 0.1 s", False
        )
        assert slow_thread.output == "error: tool 'slow_sync' timed out after 0.1 s"

    def test_exception_becomes_type_and_message(self) -> None:
        """A raised exception is reported as ``Type: message``, without a traceback."""
        result = run_one("fail", '{"reason": "city not found"}')
        assert result == ToolResult(
            "call_1", "fail", "error: tool 'fail' raised ValueError: city not found", False
        )

    def test_invalid_json(self) -> None:
        """Broken JSON says so, with the position but not the input."""
        result = run_one("get_weather", '{"city": "Oslo"' + " " * 10)
        assert not result.ok
        assert result.output.startswith(
            "error: the arguments for tool 'get_weather' are not valid JSON ("
        )
        assert "Oslo" not in result.output

    def test_arguments_must_be_an_object(self) -> None:
        """A JSON value other than an object is refused; null counts as no arguments."""
        assert run_one("get_weather", "[1, 2]").output == (
            "error: the arguments for tool 'get_weather' must be a JSON object, not an array"
        )
        assert run_one("nothing", "null").ok

    def test_invalid_arguments_name_fields_without_echoing_input(self) -> None:
        """Each invalid field is named with pydantic's message; the input is not repeated."""
        huge = "x" * 10_000
        result = run_one("get_weather", json.dumps({"days": huge, "unit": "k", "extra": 1}))
        assert not result.ok
        assert result.output.startswith("error: invalid arguments for tool 'get_weather': ")
        assert "city: Field required" in result.output
        assert "days: Input should be a valid integer" in result.output
        assert "unit: Input should be 'c' or 'f'" in result.output
        assert "extra: Extra inputs are not permitted" in result.output
        assert huge not in result.output and len(result.output) < 500

    def test_untyped_tool_with_explicit_schema_passes_arguments_through(self) -> None:
        """Without type hints the arguments reach the function as they are."""
        result = run_one("echo", '{"text": "hi", "n": 1}')
        assert result.ok and json.loads(result.output) == {"text": "hi", "n": 1}

    def test_unknown_tool_lists_the_available_ones(self) -> None:
        """An unknown name says which tools exist for this assistant."""
        result = run_one("get_wether", "{}", allowed=["get_weather", "fail"])
        assert result.output == (
            "error: unknown tool 'get_wether'; available tools: get_weather, fail"
        )

    def test_tool_not_allowed_for_this_assistant(self) -> None:
        """A registered tool outside the assistant's list is refused, not run."""
        sample_tools.EVENTS.clear()
        result = run_one("slow", '{"seconds": 0}', allowed=["get_weather"])
        assert result.output == "error: tool 'slow' is not enabled for this assistant"
        assert sample_tools.EVENTS == []

    def test_tools_own_timeout_error_is_not_a_timeout(self) -> None:
        """A TimeoutError raised by the tool itself is reported as raised, not as our timeout."""

        @tool
        async def flaky() -> str:
            """Raises its own timeout."""
            raise TimeoutError("upstream took too long")

        result = asyncio.run(
            run_tool_call(ToolRegistry([flaky]), ToolCall("x", "flaky", ""), allowed=None)
        )
        assert result.output == "error: tool 'flaky' raised TimeoutError: upstream took too long"

    def test_unserialisable_return_value(self) -> None:
        """A value that cannot become JSON is an error result, not an exception."""

        @tool
        def loop() -> list[Any]:
            """Returns a list that contains itself."""
            value: list[Any] = []
            value.append(value)
            return value

        result = asyncio.run(
            run_tool_call(ToolRegistry([loop]), ToolCall("x", "loop", "{}"), allowed=None)
        )
        assert not result.ok
        assert result.output.startswith("error: tool 'loop' returned a value that is not JSON: ")


class TestToolThreads:
    """Sync tools run on the registry's thread pool, sized to the worker's concurrency
    (asyncio's default pool has ``min(32, CPUs + 4)`` threads: 6 on a 2-core machine)."""

    CALLS = 16

    def blocking_registry(self) -> tuple[ToolRegistry, list[str]]:
        """A registry whose ``hold`` tool blocks until all CALLS calls are running at once
        (bounded: 5 s), and answers whether they were; ``names`` gets each call's thread."""
        lock = threading.Lock()
        running = [0]
        everyone_in = threading.Event()
        names: list[str] = []

        @tool
        def hold(label: str) -> str:
            """Blocks until every call of the batch is running."""
            with lock:
                running[0] += 1
                names.append(threading.current_thread().name)
                if running[0] == self.CALLS:
                    everyone_in.set()
            # No call returns before all of them started, unless they never all run at once.
            return "together" if everyone_in.wait(timeout=5.0) else "alone"

        return ToolRegistry([hold]), names

    def run_batch(self, registry: ToolRegistry) -> list[ToolResult]:
        calls = [
            ToolCall(f"c{n}", "hold", json.dumps({"label": str(n)})) for n in range(self.CALLS)
        ]
        return asyncio.run(run_tool_calls(registry, calls, allowed=None, timeout=10.0))

    def test_sixteen_blocking_sync_tools_all_run_at_once(self) -> None:
        """16 sync calls that each block until all 16 are running: on a pool of the
        worker's concurrency (16) every call started before any finished, each on a
        ``tool_N`` thread, and all finish within their timeout."""
        registry, names = self.blocking_registry()
        threads = tool_executor(16)
        registry.set_executor(threads)
        try:
            results = self.run_batch(registry)
        finally:
            threads.shutdown(wait=False, cancel_futures=True)
        assert [r.output for r in results] == ["together"] * self.CALLS
        assert len(set(names)) == self.CALLS
        assert all(name.startswith("tool_") for name in names)

    def test_the_app_gives_the_registry_its_pool_and_takes_it_back(
        self, storage: StorageEnv
    ) -> None:
        """``open_app`` sets a pool sized to WORKER_CONCURRENCY (default 16) for its life."""
        registry, names = self.blocking_registry()

        async def scenario() -> list[ToolResult]:
            async with open_app(storage.settings(), tools=registry):
                assert registry.executor is not None
                calls = [ToolCall(f"c{n}", "hold", json.dumps({"label": str(n)}))
                         for n in range(self.CALLS)]  # fmt: skip
                return await run_tool_calls(registry, calls, allowed=None, timeout=10.0)

        results = asyncio.run(scenario())
        assert [r.output for r in results] == ["together"] * self.CALLS
        assert all(name.startswith("tool_") for name in names)
        assert registry.executor is None

    def test_small_concurrency_still_gets_a_few_threads(self) -> None:
        """A worker processing one message at a time still runs a few calls at once."""
        pool = tool_executor(1)
        try:
            assert pool.size == MIN_TOOL_THREADS
        finally:
            pool.shutdown(wait=False)

    def test_hung_calls_beyond_the_pool_do_not_starve_the_next_call(self) -> None:
        """More hung sync calls than threads time out; the next call still runs, on a thread
        that took a stuck one's place. The stuck threads are counted until they return, and
        then leave: the pool is back to its size."""
        let_go = threading.Event()

        @tool
        def hang(label: str) -> str:
            """Blocks until the test lets go."""
            let_go.wait(timeout=30)
            return label

        @tool
        def quick() -> str:
            """Answers at once."""
            return "quick"

        registry = ToolRegistry([hang, quick])
        threads = tool_executor(1)
        registry.set_executor(threads)
        hung = [ToolCall(f"h{n}", "hang", json.dumps({"label": str(n)})) for n in range(6)]

        async def scenario() -> tuple[list[ToolResult], ToolResult, int]:
            stalled = await run_tool_calls(registry, hung, allowed=None, timeout=0.3)
            after = await run_tool_call(registry, ToolCall("q", "quick", ""), allowed=None)
            return stalled, after, threads.stuck

        try:
            stalled, after, stuck = asyncio.run(scenario())
            assert [r.output for r in stalled] == ["error: tool 'hang' timed out after 0.3 s"] * 6
            assert after.ok and after.output == "quick"
            assert stuck >= threads.size == MIN_TOOL_THREADS
            assert threads.abandoned == stuck
            let_go.set()
            asyncio.run(
                wait_until(
                    lambda: threads.stuck == 0 and threads.alive() <= threads.size,
                    5,
                    "the stuck threads to return and leave",
                )
            )
        finally:
            let_go.set()
            threads.shutdown(wait=False)

    def test_without_a_pool_sync_tools_use_asyncio_default(self) -> None:
        """No executor set (a registry used on its own): asyncio's default pool, as before."""

        @tool
        def where() -> str:
            """The name of the thread it runs on."""
            return threading.current_thread().name

        [result] = asyncio.run(
            run_tool_calls(ToolRegistry([where]), [ToolCall("a", "where", "")], allowed=None)
        )
        assert result.ok and result.output.startswith("asyncio_")
