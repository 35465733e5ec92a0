"""Function tools: the ``@tool`` decorator, an explicit registry, and running the model's calls.

``@tool`` attaches a :class:`ToolSpec` to a function and returns the function unchanged; nothing
is registered globally. ``load_tools`` imports the modules named in ``WORKER_TOOLS`` and builds a
:class:`ToolRegistry` from the decorated functions it finds; the registry is passed down to the
run handler, which runs the model's calls with ``handlers.tool_calls``. This module imports
neither Azure nor openai.
"""

import asyncio
import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass, replace
from typing import Any, TypeVar, overload

import pydantic
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ToolLoadError",
    "ToolRegistry",
    "ToolSpec",
    "ToolThreads",
    "load_tools",
    "tool",
    "tool_executor",
    "tool_spec",
]

F = TypeVar("F", bound=Callable[..., Any])

# Called once per executed tool call with (tool name, outcome, seconds); see set_observer.
ToolObserver = Callable[[str, str, float], None]
# Runs one call (a handlers.tool_calls.ToolCall and the awaitable of its ToolResult) inside a
# span and returns its result; see set_call_tracer.
ToolCallTracer = Callable[[Any, Awaitable[Any]], Awaitable[Any]]

# The attribute ``@tool`` sets on a function; ``tool_spec`` reads it back.
SPEC_ATTRIBUTE = "__assistant_tool__"

# What OpenAI accepts as a function name (Chat Completions, Responses and Assistants alike).
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolLoadError(Exception):
    """A tool module could not be loaded; the message is one line naming the module and cause."""


@dataclass(frozen=True, eq=False)
class ToolSpec:
    """What the model is told about a tool, and how to call it.

    ``arguments_model`` validates the parsed JSON arguments before the call; it is ``None`` only
    when ``parameters`` were given explicitly and the signature has no type hints, in which case
    the arguments are passed through as keyword arguments.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    function: Callable[..., Any]
    arguments_model: type[BaseModel] | None
    # (parameter name, model field name, positional-only) in signature order.
    fields: tuple[tuple[str, str, bool], ...] = ()
    accepts_extra: bool = False
    is_async: bool = False
    # Safe to run again: a call interrupted when its worker died is run again, not answered
    # with an "interrupted" error (reads and other idempotent tools should say so).
    idempotent: bool = False
    # Every call waits for a person's decision (submitToolApprovals) before it runs, whatever
    # the assistant's approvalRequired says.
    approval: bool = False


# --- the decorator -----------------------------------------------------------------------------


@overload
def tool(function: F, /) -> F: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    idempotent: bool = False,
    approval: bool = False,
) -> Callable[[F], F]: ...


def tool(
    function: F | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    idempotent: bool = False,
    approval: bool = False,
) -> F | Callable[[F], F]:
    """Mark a sync or async function as a tool; use bare (``@tool``) or with overrides.

    By default the name is the function's name, the description its docstring, and
    ``parameters`` the JSON Schema of its signature (type hints and defaults, via pydantic;
    ``Annotated[str, Field(description=...)]`` documents a parameter). The function is returned
    unchanged and stays callable as before. A signature pydantic cannot describe raises
    ``TypeError`` here, at import time, so a broken tool stops the worker at start.

    Each call runs at most once: a call whose worker died while running it is answered with an
    "interrupted" error rather than run again, since it may have taken effect. A tool that is
    safe to run twice (a lookup) says ``idempotent=True``, and is then run again.

    ``approval=True``: every call waits for a person's decision before it runs (SPEC §5.5),
    for every assistant, as if each named the tool in its ``approvalRequired``.
    """

    def decorate(fn: F) -> F:
        spec = build_spec(fn, name, description, parameters)
        setattr(fn, SPEC_ATTRIBUTE, replace(spec, idempotent=idempotent, approval=approval))
        return fn

    return decorate(function) if function is not None else decorate


def tool_spec(function: Callable[..., Any]) -> ToolSpec | None:
    """The spec ``@tool`` attached to ``function``, or ``None`` for a plain function."""
    spec = getattr(function, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, ToolSpec) else None


def build_spec(
    function: Callable[..., Any],
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> ToolSpec:
    """The spec of ``function`` with the given overrides (what ``@tool`` attaches)."""
    tool_name = name if name is not None else getattr(function, "__name__", "")
    if not _NAME_PATTERN.match(tool_name):
        raise ValueError(f"tool name {tool_name!r} must match {_NAME_PATTERN.pattern}")
    if description is None:
        doc = getattr(function, "__doc__", None)
        description = inspect.cleandoc(doc) if doc else ""

    try:
        # eval_str resolves string annotations (``from __future__ import annotations``).
        signature = inspect.signature(function, eval_str=True)
    except Exception as exc:  # an unresolvable forward reference, typically
        raise TypeError(f"tool {tool_name!r}: cannot read its signature: {exc}") from exc
    named = [
        p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    accepts_extra = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    typed = any(p.annotation is not p.empty for p in signature.parameters.values())
    # Field names are positional placeholders and the real names are aliases, so that any
    # parameter name works (``_private``, ``model_id``, ``json``) without pydantic's rules or
    # warnings about names that clash with BaseModel.
    fields = tuple((p.name, f"p{i}", p.kind is p.POSITIONAL_ONLY) for i, p in enumerate(named))

    schema: dict[str, Any] = copy.deepcopy(dict(parameters)) if parameters is not None else {}
    model: type[BaseModel] | None = None
    if parameters is None or typed:
        definitions: dict[str, Any] = {
            field: (
                Any if p.annotation is p.empty else p.annotation,
                Field(alias=p.name)
                if p.default is p.empty
                else Field(default=p.default, alias=p.name),
            )
            for p, (_, field, _) in zip(named, fields, strict=True)
        }
        config = ConfigDict(extra="allow" if accepts_extra else "forbid")
        try:
            model = pydantic.create_model(
                f"{tool_name}_arguments", __config__=config, **definitions
            )
            if parameters is None:
                schema = _object_schema(model.model_json_schema())
        except Exception as exc:
            raise TypeError(f"tool {tool_name!r}: cannot describe its parameters: {exc}") from exc

    return ToolSpec(
        name=tool_name,
        description=description,
        parameters=schema,
        function=function,
        arguments_model=model,
        fields=fields,
        accepts_extra=accepts_extra,
        is_async=inspect.iscoroutinefunction(function),
    )


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The pydantic schema as OpenAI likes it: an object, ``required`` always present, no titles."""
    cleaned = _strip_titles(schema)
    return {
        "type": "object",
        "properties": cleaned.get("properties", {}),
        "required": cleaned.get("required", []),
        **{k: v for k, v in cleaned.items() if k not in ("type", "properties", "required")},
    }


# Keys whose values are maps of *names* to schemas (a property may well be called "title").
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
# Keys whose values are data, not schemas.
_DATA_KEYS = frozenset({"default", "const", "enum", "examples", "required"})


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strip_titles(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    cleaned: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _DATA_KEYS:
            cleaned[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            cleaned[key] = {name: _strip_titles(sub) for name, sub in value.items()}
        else:
            cleaned[key] = _strip_titles(value)
    return cleaned


# --- the registry ------------------------------------------------------------------------------


class ToolRegistry:
    """The tools this worker can run, by name; built once at start and passed down explicitly."""

    def __init__(self, functions: Iterable[Callable[..., Any]] = ()) -> None:
        self._specs: dict[str, ToolSpec] = {}
        self._observer: ToolObserver | None = None
        # Traces each call (SPEC §10): off unless the app sets one.
        self.call_tracer: ToolCallTracer | None = None
        # Where sync tools run (see set_executor); None: asyncio's default thread pool.
        self.executor: Executor | None = None
        # name -> (registered spec, its observed copy)
        self._observed: dict[str, tuple[ToolSpec, ToolSpec]] = {}
        for function in functions:
            self.register(function)

    def register(self, function: Callable[..., Any]) -> ToolSpec:
        """Add a ``@tool`` function, or a plain one (described by the defaults); returns its spec.

        Registering the same function twice is harmless; a different function under a name
        already taken raises ``ValueError``.
        """
        spec = tool_spec(function) or build_spec(function)
        existing = self._specs.get(spec.name)
        if existing is not None and existing.function is not spec.function:
            raise ValueError(
                f"duplicate tool name {spec.name!r}: {_origin(existing.function)} "
                f"and {_origin(spec.function)}"
            )
        self._specs[spec.name] = spec
        return spec

    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._specs)

    def approval_names(self) -> list[str]:
        """The tools declared ``@tool(approval=True)``: their calls always wait for a decision."""
        return [name for name, spec in self._specs.items() if spec.approval]

    def get(self, name: str) -> ToolSpec | None:
        """The spec registered under ``name``, or ``None`` (observed, see ``set_observer``)."""
        spec = self._specs.get(name)
        if spec is None or self._observer is None:
            return spec
        return self._observed_spec(spec, self._observer)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def definitions(self, allowed: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Chat Completions ``tools``: ``[{"type": "function", "function": {...}}]``.

        Only the names in ``allowed`` (all when ``None``), in registration order; names that are
        not registered are ignored (they may be external tools the caller describes itself).
        """
        return [
            {"type": "function", "function": self._definition(spec)}
            for spec in self._selected(allowed)
        ]

    def responses_definitions(self, allowed: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Responses API ``tools``: ``[{"type": "function", "name", "description", ...}]``."""
        return [{"type": "function", **self._definition(spec)} for spec in self._selected(allowed)]

    def _selected(self, allowed: Iterable[str] | None) -> list[ToolSpec]:
        if allowed is None:
            return list(self._specs.values())
        wanted = set(allowed)
        return [spec for name, spec in self._specs.items() if name in wanted]

    def set_executor(self, executor: Executor | None) -> None:
        """Run sync tools on ``executor`` (``tool_executor``, set by the app for its life);
        None: on asyncio's default pool, which has only ``min(32, CPUs + 4)`` threads, so
        that under full concurrency calls would wait for a thread past their timeout."""
        self.executor = executor

    # --- observation (metrics); off unless the app sets an observer ----------------------------

    def set_observer(self, observer: ToolObserver | None) -> None:
        """Report every execution of a registered tool to ``observer(name, outcome, seconds)``,
        outcome ``ok``, ``error`` (it raised) or ``cancelled`` (an async tool that timed out,
        or shutdown; a sync tool's thread cannot be stopped, so one that timed out is reported
        when it returns). A sync tool reports from its worker thread.

        Calls rejected before running (unknown or not allowed tool, invalid arguments) are not
        executions and are not reported. ``get`` then returns a copy of the spec whose
        function reports; the registered spec is unchanged."""
        self._observer = observer
        self._observed.clear()

    def observe(self, name: str, outcome: str, seconds: float) -> None:
        """Report an execution that is not a registered tool's (an MCP tool's) to the
        observer, if one is set."""
        if self._observer is not None:
            self._observer(name, outcome, seconds)

    def set_call_tracer(self, tracer: ToolCallTracer | None) -> None:
        """Run every tool call (``run_tool_calls``) through ``tracer(call, running)``, which
        awaits ``running`` inside an ``execute_tool`` span; None: calls run untraced."""
        self.call_tracer = tracer

    def _observed_spec(self, spec: ToolSpec, observer: ToolObserver) -> ToolSpec:
        cached = self._observed.get(spec.name)
        if cached is not None and cached[0] is spec:
            return cached[1]
        function = spec.function
        name = spec.name

        if spec.is_async:

            async def reported_async(*args: Any, **kwargs: Any) -> Any:
                started = time.monotonic()
                outcome = "error"
                try:
                    value = await function(*args, **kwargs)
                    outcome = "ok"
                    return value
                except asyncio.CancelledError:
                    outcome = "cancelled"
                    raise
                finally:
                    observer(name, outcome, time.monotonic() - started)

            wrapper: Callable[..., Any] = reported_async
        else:

            def reported(*args: Any, **kwargs: Any) -> Any:
                started = time.monotonic()
                outcome = "error"
                try:
                    value = function(*args, **kwargs)
                    outcome = "ok"
                    return value
                finally:
                    observer(name, outcome, time.monotonic() - started)

            wrapper = reported
        observed = dataclasses.replace(spec, function=wrapper)
        self._observed[name] = (spec, observed)
        return observed

    @staticmethod
    def _definition(spec: ToolSpec) -> dict[str, Any]:
        # A copy: callers may add provider-specific keys (strict, ...) without touching the spec.
        return {
            "name": spec.name,
            "description": spec.description,
            "parameters": copy.deepcopy(dict(spec.parameters)),
        }


# Threads of the sync-tool pool at the least, however low the worker's concurrency.
MIN_TOOL_THREADS = 4


@dataclass(eq=False)
class _Call:
    """One sync tool call handed to ``ToolThreads``."""

    future: Future[Any]
    run: Callable[[], Any]
    running: bool = False
    # Its caller gave up while it ran (timeout or cancellation): its thread is stuck.
    stuck: bool = False


class ToolThreads(Executor):
    """The threads sync tools run on: ``size`` of them, not counting stuck ones.

    A thread cannot be stopped: a sync tool that hangs keeps its thread after its caller gave
    up (the call's timeout, or shutdown). On a fixed pool such threads pile up until every
    call waits for a thread past its own timeout, and then no sync tool runs at all. Here a
    thread whose call was abandoned while it ran is *stuck*: it is no longer counted, and a
    new thread takes its place, so the calls that follow always have ``size`` threads. A
    stuck thread that returns after all leaves if its place was taken meanwhile.

    ``stuck`` is how many stuck threads have not returned (``/readyz`` reports it as degraded,
    and ``assistant_worker_tool_threads_stuck``), ``abandoned`` how many ever were. The
    threads are daemons: a hung tool does not keep the process from exiting.

    ``submit`` hands out futures that stay pending while their call runs, so that a caller's
    cancellation reaches this class: ``run_in_executor`` cancels the future when the task
    awaiting it is cancelled (an ``asyncio.timeout`` included).
    """

    def __init__(self, threads: int, name: str = "tool") -> None:
        self.size = max(threads, MIN_TOOL_THREADS)
        self._name = name
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._alive = 0  # threads started and not ended, stuck ones included
        self._running = 0  # threads running a call, stuck ones included
        self._queued = 0  # calls waiting for a thread
        self._stuck = 0
        self._started = 0
        self._closed = False
        self.abandoned = 0

    @property
    def stuck(self) -> int:
        return self._stuck

    def alive(self) -> int:
        """Threads started and not ended, stuck ones included."""
        return self._alive

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        call = _Call(Future(), functools.partial(fn, *args, **kwargs))
        call.future.add_done_callback(lambda _: self._abandoned(call))
        with self._lock:
            if self._closed:
                raise RuntimeError("the tool threads are shut down")
            self._queued += 1
            self._work.put(call)
            self._start_threads()
        return call.future

    def _start_threads(self) -> None:
        """Start a thread when calls wait for more threads than are idle and fewer than
        ``size`` threads are alive and not stuck (under the lock)."""
        idle = self._alive - self._running
        if self._queued > idle and self._alive - self._stuck < self.size:
            self._alive += 1
            self._started += 1
            thread = threading.Thread(
                target=self._serve, name=f"{self._name}_{self._started - 1}", daemon=True
            )
            thread.start()

    def _abandoned(self, call: _Call) -> None:
        """A call's future is done: if it was cancelled while it ran, its thread is stuck."""
        if not call.future.cancelled():
            return
        with self._lock:
            if call.running and not call.stuck:
                call.stuck = True
                self._stuck += 1
                self.abandoned += 1
                self._start_threads()

    def _serve(self) -> None:
        while True:
            call = self._work.get()
            if call is None:
                with self._lock:
                    self._alive -= 1
                return
            with self._lock:
                self._queued -= 1
                if call.future.cancelled():
                    continue  # its caller gave up before it started
                call.running = True
                self._running += 1
            value: Any = None
            error: BaseException | None = None
            try:
                value = call.run()
            except BaseException as exc:  # the tool's failure goes to its caller
                error = exc
            with self._lock:
                call.running = False
                self._running -= 1
                replaced = call.stuck
                if replaced:
                    self._stuck -= 1
            if not replaced:
                with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                    if error is None:
                        call.future.set_result(value)
                    else:
                        call.future.set_exception(error)
            with self._lock:
                # A stuck thread that came back after its place was taken leaves.
                if self._alive - self._stuck > self.size:
                    self._alive -= 1
                    return

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; the threads end once the calls they run return (stuck ones
        perhaps never: they are daemons). ``wait`` is ignored: nothing can wait for a thread
        that may never return."""
        dropped: list[_Call] = []
        with self._lock:
            self._closed = True
            while cancel_futures:
                try:
                    call = self._work.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    self._queued -= 1
                    dropped.append(call)
            for _ in range(self._alive):
                self._work.put(None)
        # Outside the lock: cancelling runs the futures' callbacks, which take it.
        for call in dropped:
            call.future.cancel()


def tool_executor(concurrency: int) -> ToolThreads:
    """The threads sync tools run on: one per message the worker processes at once (at least
    ``MIN_TOOL_THREADS``), named ``tool_N``, replaced when stuck (see ``ToolThreads``). Its
    owner shuts it down."""
    return ToolThreads(concurrency)


def _origin(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", "?")
    qualname = getattr(function, "__qualname__", repr(function))
    return f"{module}.{qualname}"


def load_tools(modules: Iterable[str]) -> ToolRegistry:
    """Import each module and register its module-level ``@tool`` functions.

    Raises ``ToolLoadError`` (one line, naming the module and the cause) when a module cannot be
    imported, defines no tools, or defines a name another module already took.
    """
    registry = ToolRegistry()
    for module_name in (m.strip() for m in modules):
        if not module_name:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # whatever the import raised, the worker must not start
            raise ToolLoadError(
                f"cannot import tool module {module_name!r}: {describe_exception(exc)}"
            ) from exc
        found = [value for value in vars(module).values() if tool_spec(value) is not None]
        if not found:
            raise ToolLoadError(f"tool module {module_name!r} defines no @tool functions")
        for function in found:
            try:
                registry.register(function)
            except ValueError as exc:
                raise ToolLoadError(f"tool module {module_name!r}: {exc}") from exc
    return registry


# Keep error texts short: they go back to the model and into the stored history.
MAX_EXCEPTION_CHARS = 2000


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` without a traceback, shortened."""
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return shorten(text, MAX_EXCEPTION_CHARS)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
