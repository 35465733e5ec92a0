"""Tools for the tests of ``handlers.tools``: sync and async, typed, failing and slow."""

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from handlers.tools import tool

# (label, "start" | "end", time.monotonic()) recorded by the slow tools, to check overlap.
EVENTS: list[tuple[str, str, float]] = []


@dataclass(frozen=True)
class Forecast:
    """A structured return value: tools may return more than strings."""

    city: str
    days: int
    unit: str


@tool
def get_weather(
    city: Annotated[str, Field(description="The city name, e.g. Paris")],
    days: int = 1,
    unit: Literal["c", "f"] = "c",
) -> Forecast:
    """Get the weather forecast for a city.

    Returns one entry per day.
    """
    return Forecast(city, days, unit)


@tool(name="lookup_order", description="Find an order by its number.")
async def find_order(order_id: int, include_items: bool = False) -> dict[str, Any]:
    """This docstring is not the description: the decorator's argument is."""
    await asyncio.sleep(0)
    return {"order": order_id, "items": ["book"] if include_items else []}


@tool
def fail(reason: str) -> str:
    """Always raises, with the reason given."""
    raise ValueError(reason)


@tool
async def slow(seconds: float, label: str = "async") -> str:
    """Sleep on the event loop, recording when it started and ended."""
    EVENTS.append((label, "start", time.monotonic()))
    await asyncio.sleep(seconds)
    EVENTS.append((label, "end", time.monotonic()))
    return f"slept {seconds}"


@tool
def slow_sync(seconds: float, label: str = "sync") -> str:
    """Sleep in a thread, recording when it started and ended."""
    EVENTS.append((label, "start", time.monotonic()))
    time.sleep(seconds)
    EVENTS.append((label, "end", time.monotonic()))
    return f"slept {seconds}"


@tool(
    parameters={
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    }
)
def echo(**kwargs):  # type: ignore[no-untyped-def]  # untyped on purpose: arguments pass through
    """Echo the arguments back."""
    return kwargs


@tool
def nothing() -> None:
    """Do nothing and return None."""


def helper() -> str:
    """A plain function: not a tool, so ``load_tools`` leaves it out."""
    return "not a tool"
