"""Function tools: the ``@tool`` decorator, an explicit registry, and running the model's calls.

``@tool`` attaches a :class:`ToolSpec` to a function and returns the function unchanged; nothing
is registered globally. ``load_tools`` imports the modules named in ``WORKER_TOOLS`` and builds a
:class:`ToolRegistry` from the decorated functions it finds; the registry is passed down to the
run handler, which calls :func:`run_tool_calls`.

Every failure of a tool call (bad JSON, invalid arguments, unknown or not-allowed tool, timeout,
exception) becomes a :class:`ToolResult` with ``ok=False`` and an ``error: ...`` text the model
can read and act on: a tool never fails the run. This module imports neither Azure nor openai.
"""

import asyncio
import copy
import importlib
import inspect
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python

__all__ = [
    "ToolCall",
    "ToolLoadError",
    "ToolRegistry",
    "ToolResult",
    "ToolSpec",
    "load_tools",
    "run_tool_call",
    "run_tool_calls",
    "tool",
    "tool_spec",
]

F = TypeVar("F", bound=Callable[..., Any])

# The attribute ``@tool`` sets on a function; ``tool_spec`` reads it back.
SPEC_ATTRIBUTE = "__assistant_tool__"

# What OpenAI accepts as a function name (Chat Completions, Responses and Assistants alike).
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Keep error texts short: they go back to the model and into the stored history.
_MAX_ERRORS_SHOWN = 10
_MAX_MESSAGE_CHARS = 300
_MAX_EXCEPTION_CHARS = 2000


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


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for; ``arguments`` is the raw JSON string the model produced."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: ``output`` is what the model sees, ``ok`` whether it succeeded."""

    call_id: str
    name: str
    output: str
    ok: bool


# --- the decorator -----------------------------------------------------------------------------


@overload
def tool(function: F, /) -> F: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> Callable[[F], F]: ...


def tool(
    function: F | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> F | Callable[[F], F]:
    """Mark a sync or async function as a tool; use bare (``@tool``) or with overrides.

    By default the name is the function's name, the description its docstring, and
    ``parameters`` the JSON Schema of its signature (type hints and defaults, via pydantic;
    ``Annotated[str, Field(description=...)]`` documents a parameter). The function is returned
    unchanged and stays callable as before. A signature pydantic cannot describe raises
    ``TypeError`` here, at import time, so a broken tool stops the worker at start.
    """

    def decorate(fn: F) -> F:
        setattr(fn, SPEC_ATTRIBUTE, build_spec(fn, name, description, parameters))
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

    def get(self, name: str) -> ToolSpec | None:
        """The spec registered under ``name``, or ``None``."""
        return self._specs.get(name)

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

    @staticmethod
    def _definition(spec: ToolSpec) -> dict[str, Any]:
        # A copy: callers may add provider-specific keys (strict, ...) without touching the spec.
        return {
            "name": spec.name,
            "description": spec.description,
            "parameters": copy.deepcopy(dict(spec.parameters)),
        }


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
                f"cannot import tool module {module_name!r}: {_describe(exc)}"
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


# --- running calls -----------------------------------------------------------------------------


async def run_tool_calls(
    registry: ToolRegistry,
    calls: Sequence[ToolCall],
    *,
    allowed: Collection[str] | None,
    # A per-call limit that turns into a result, not a deadline for the caller to wrap around.
    timeout: float = 30.0,  # noqa: ASYNC109
) -> list[ToolResult]:
    """Run the calls concurrently, each with its own timeout; results in the order of ``calls``.

    Never raises for a tool's failure (see :func:`run_tool_call`); only cancellation of the
    caller propagates.
    """
    results = await asyncio.gather(
        *(run_tool_call(registry, call, allowed=allowed, timeout=timeout) for call in calls)
    )
    return list(results)


async def run_tool_call(
    registry: ToolRegistry,
    call: ToolCall,
    *,
    allowed: Collection[str] | None,
    # An expired limit becomes a result; a caller's asyncio.timeout would raise instead.
    timeout: float = 30.0,  # noqa: ASYNC109
) -> ToolResult:
    """Validate and run one call; every failure becomes a result with ``ok=False``.

    ``allowed`` is the assistant's tool list (``None``: every registered tool). Sync functions run
    in a thread (``asyncio.to_thread``); a sync tool that times out keeps its thread until it
    returns, as threads cannot be stopped, but its late result is discarded.

    The output is the returned string as is; any other value is JSON (pydantic models,
    dataclasses and dates included, anything else via ``str``). ``None`` becomes ``"null"``,
    not ``""``: every output is then valid JSON or the tool's own text, and some
    OpenAI-compatible servers reject an empty tool message.
    """

    def failed(output: str) -> ToolResult:
        return ToolResult(call.id, call.name, "error: " + output, ok=False)

    spec = registry.get(call.name)
    if allowed is not None and call.name not in allowed:
        if spec is None:
            return failed(_unknown(call.name, registry, allowed))
        return failed(f"tool {call.name!r} is not enabled for this assistant")
    if spec is None:
        return failed(_unknown(call.name, registry, allowed))

    try:
        parsed = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError as exc:
        # The position is enough to see what broke; the input itself is not echoed.
        return failed(f"the arguments for tool {call.name!r} are not valid JSON ({exc})")
    if parsed is None:  # some models send "null" for a function without parameters
        parsed = {}
    if not isinstance(parsed, dict):
        return failed(
            f"the arguments for tool {call.name!r} must be a JSON object, not {_json_type(parsed)}"
        )

    try:
        args, kwargs = _bind(spec, parsed)
    except pydantic.ValidationError as exc:
        return failed(f"invalid arguments for tool {call.name!r}: {_validation_summary(exc)}")

    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            value = await _invoke(spec, args, kwargs)
    except TimeoutError as exc:
        if deadline.expired():
            return failed(f"tool {call.name!r} timed out after {timeout:g} s")
        # The tool's own TimeoutError (an HTTP client's, say) is a failure like any other.
        return failed(f"tool {call.name!r} raised {_describe(exc)}")
    except Exception as exc:  # a tool's failure is the model's information, not ours
        return failed(f"tool {call.name!r} raised {_describe(exc)}")

    if isinstance(value, str):
        return ToolResult(call.id, call.name, value, ok=True)
    try:
        output = json.dumps(to_jsonable_python(value, fallback=str), ensure_ascii=False)
    except Exception as exc:  # e.g. a circular structure
        return failed(f"tool {call.name!r} returned a value that is not JSON: {_describe(exc)}")
    return ToolResult(call.id, call.name, output, ok=True)


def _bind(spec: ToolSpec, arguments: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Validate ``arguments`` and split them into the positional and keyword arguments."""
    if spec.arguments_model is None:
        return [], dict(arguments)
    validated = spec.arguments_model.model_validate(arguments)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for parameter, field, positional_only in spec.fields:
        value = getattr(validated, field)
        if positional_only:
            args.append(value)
        else:
            kwargs[parameter] = value
    if spec.accepts_extra and validated.model_extra:
        kwargs.update(validated.model_extra)
    return args, kwargs


async def _invoke(spec: ToolSpec, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if spec.is_async:
        return await spec.function(*args, **kwargs)
    value = await asyncio.to_thread(spec.function, *args, **kwargs)
    # A sync callable may still hand back an awaitable (an object with an async __call__,
    # a partial of a coroutine function): await it here, on the loop.
    if inspect.isawaitable(value):
        value = await value
    return value


def _unknown(name: str, registry: ToolRegistry, allowed: Collection[str] | None) -> str:
    available = [n for n in registry.names() if allowed is None or n in allowed]
    listing = ", ".join(available) if available else "none"
    return f"unknown tool {_shorten(name, 100)!r}; available tools: {listing}"


def _validation_summary(error: pydantic.ValidationError) -> str:
    # include_input=False: the model's (possibly huge) input is not echoed back to it.
    errors = error.errors(include_input=False, include_url=False, include_context=False)
    parts = []
    for item in errors[:_MAX_ERRORS_SHOWN]:
        location = ".".join(str(part) for part in item["loc"]) or "(arguments)"
        parts.append(f"{location}: {_shorten(item['msg'], _MAX_MESSAGE_CHARS)}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)


def _describe(exc: BaseException) -> str:
    """``Type: message`` without a traceback, shortened."""
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return _shorten(text, _MAX_EXCEPTION_CHARS)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"
