"""Running the model's tool calls: concurrently, each validated and bounded by a timeout.

Every failure of a tool call (bad JSON, invalid arguments, unknown or not-allowed tool, timeout,
exception) becomes a :class:`ToolResult` with ``ok=False`` and an ``error: ...`` text the model
can read and act on: a tool never fails the run. This module imports neither Azure nor openai.
"""

import asyncio
import contextvars
import functools
import inspect
import json
from collections.abc import Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import pydantic
import structlog
from pydantic_core import to_jsonable_python

from handlers.tools import ToolRegistry, ToolSpec, describe_exception, shorten

log = structlog.get_logger("worker.runs")

# Keep error texts short: they go back to the model and into the stored history.
_MAX_ERRORS_SHOWN = 10
_MAX_MESSAGE_CHARS = 300


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
    traced = registry.call_tracer or (lambda _call, running: running)
    results = await asyncio.gather(
        *(
            traced(call, run_tool_call(registry, call, allowed=allowed, timeout=timeout))
            for call in calls
        )
    )
    for result in results:
        if not result.ok:
            # The model reads the error and goes on; the operator reads it here (the log's
            # processors mask secrets).
            log.warning(
                "tool.failed", tool=result.name, call_id=result.call_id, error=result.output
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
    in a thread of the registry's executor (``ToolRegistry.set_executor``; else
    ``asyncio.to_thread``); a sync tool that times out keeps its thread until it returns, as
    threads cannot be stopped, but its late result is discarded.

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

    parsed = parse_arguments(call)
    if isinstance(parsed, str):
        return failed(parsed)

    try:
        args, kwargs = _bind(spec, parsed)
    except pydantic.ValidationError as exc:
        return failed(f"invalid arguments for tool {call.name!r}: {_validation_summary(exc)}")

    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            value = await _invoke(spec, args, kwargs, registry.executor)
    except TimeoutError as exc:
        if deadline.expired():
            return failed(f"tool {call.name!r} timed out after {timeout:g} s")
        # The tool's own TimeoutError (an HTTP client's, say) is a failure like any other.
        return failed(f"tool {call.name!r} raised {describe_exception(exc)}")
    except Exception as exc:  # a tool's failure is the model's information, not ours
        return failed(f"tool {call.name!r} raised {describe_exception(exc)}")

    if isinstance(value, str):
        return ToolResult(call.id, call.name, value, ok=True)
    try:
        output = json.dumps(to_jsonable_python(value, fallback=str), ensure_ascii=False)
    except Exception as exc:  # e.g. a circular structure
        return failed(
            f"tool {call.name!r} returned a value that is not JSON: {describe_exception(exc)}"
        )
    return ToolResult(call.id, call.name, output, ok=True)


def parse_arguments(call: ToolCall) -> dict[str, Any] | str:
    """The call's arguments as a JSON object, or what is wrong with them (for the model)."""
    try:
        parsed = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError as exc:
        # The position is enough to see what broke; the input itself is not echoed.
        return f"the arguments for tool {call.name!r} are not valid JSON ({exc})"
    if parsed is None:  # some models send "null" for a function without parameters
        return {}
    if not isinstance(parsed, dict):
        return (
            f"the arguments for tool {call.name!r} must be a JSON object, not {_json_type(parsed)}"
        )
    return parsed


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


async def _invoke(
    spec: ToolSpec, args: list[Any], kwargs: dict[str, Any], executor: Executor | None
) -> Any:
    if spec.is_async:
        return await spec.function(*args, **kwargs)
    if executor is None:
        value = await asyncio.to_thread(spec.function, *args, **kwargs)
    else:
        # As asyncio.to_thread does, on the registry's pool: the caller's context (its trace
        # span) goes with the call.
        context = contextvars.copy_context()
        call = functools.partial(context.run, spec.function, *args, **kwargs)
        value = await asyncio.get_running_loop().run_in_executor(executor, call)
    # A sync callable may still hand back an awaitable (an object with an async __call__,
    # a partial of a coroutine function): await it here, on the loop.
    if inspect.isawaitable(value):
        value = await value
    return value


def _unknown(name: str, registry: ToolRegistry, allowed: Collection[str] | None) -> str:
    available = [n for n in registry.names() if allowed is None or n in allowed]
    listing = ", ".join(available) if available else "none"
    return f"unknown tool {shorten(name, 100)!r}; available tools: {listing}"


def _validation_summary(error: pydantic.ValidationError) -> str:
    # include_input=False: the model's (possibly huge) input is not echoed back to it.
    errors = error.errors(include_input=False, include_url=False, include_context=False)
    parts = []
    for item in errors[:_MAX_ERRORS_SHOWN]:
        location = ".".join(str(part) for part in item["loc"]) or "(arguments)"
        parts.append(f"{location}: {shorten(item['msg'], _MAX_MESSAGE_CHARS)}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"
