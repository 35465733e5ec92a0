"""Deterministic faults for the fake OpenAI server: 429, 500, slow answers, dropped connections.

A rule matches model calls by api, endpoint and model. `count=N` fires on the next N matching
calls; `every=K` on every K-th matching call (K=2: exactly half of them); both together: every
K-th call, N times at most. Rules are checked in the order they were added; every rule counts
every call it matches (whether or not an earlier rule answered it), so `every` stays exact.
`rate=P` (0 < P <= 1): each matching call fires with probability P, drawn from the rule's own
`random.Random(seed)`, so a run with the same seed and the same order of calls faults the same
calls (combined with `count`: at most N times; with `every`: among every K-th call).

Mid-stream faults: with `after_chunks=N` (or `after_fraction=F`, a share of the call's chunks)
a rule matches only streamed calls (`stream=true`), and fires after that many chunks of text or
arguments were sent: `drop` closes the connection, `429` and `500` send an error event (the
status line was sent long before), `slow` stalls the stream for `delay` seconds.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

__all__ = ["APIS", "ENDPOINTS", "FaultBook", "FaultKind", "FaultRule"]

FaultKind = Literal["429", "500", "slow", "drop"]
_KINDS: tuple[str, ...] = get_args(FaultKind)

# Endpoints that call (or poll) the model, by API. Faults apply to these only.
ENDPOINTS: dict[str, str] = {
    "chat.create": "chat",
    "responses.create": "responses",
    "responses.retrieve": "responses",
    "runs.create": "assistants",
    "runs.submit": "assistants",
    "runs.retrieve": "assistants",
}
# The endpoints that make the model produce output; `FakeOpenAI.calls` counts these by default.
GENERATING = ("chat.create", "responses.create", "runs.create", "runs.submit")
APIS = ("chat", "responses", "assistants")


def _names(value: str | Sequence[str] | None, known: Sequence[str], what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    names = frozenset([value] if isinstance(value, str) else value)
    unknown = names - set(known)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; known: {', '.join(known)}")
    return names


@dataclass
class FaultRule:
    """One fault; build it with `FaultBook.add` (or `FakeOpenAI.fault`)."""

    kind: FaultKind
    count: int | None = None
    every: int | None = None
    models: frozenset[str] = frozenset()
    apis: frozenset[str] = frozenset()
    endpoints: frozenset[str] = frozenset()
    retry_after: float | None = None
    delay: float | None = None
    rate: float | None = None
    seed: int | None = None
    after_chunks: int | None = None
    after_fraction: float | None = None
    seen: int = 0
    fired: int = 0
    _random: random.Random | None = field(default=None, repr=False, compare=False)

    def draw(self) -> bool:
        """Whether a due call fires: always without `rate`, else with probability `rate`."""
        if self.rate is None:
            return True
        if self._random is None:
            self._random = random.Random(self.seed)
        return self._random.random() < self.rate

    @property
    def exhausted(self) -> bool:
        """True once `count` faults have fired."""
        return self.count is not None and self.fired >= self.count

    @property
    def mid_stream(self) -> bool:
        """True for a rule that fires inside a stream (after some of its chunks)."""
        return self.after_chunks is not None or self.after_fraction is not None

    def fires_after(self, chunks: int) -> int:
        """How many of a stream's ``chunks`` are sent before this mid-stream rule fires."""
        if self.after_chunks is not None:
            return min(self.after_chunks, chunks)
        return int(chunks * (self.after_fraction or 0.0))

    def matches(self, api: str, endpoint: str, model: str | None, streamed: bool = False) -> bool:
        """Whether a call is one this rule counts (a mid-stream rule: streamed calls only)."""
        return (
            (streamed or not self.mid_stream)
            and (not self.apis or api in self.apis)
            and (not self.endpoints or endpoint in self.endpoints)
            and (not self.models or model in self.models)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "kind": self.kind,
            "count": self.count,
            "every": self.every,
            "model": sorted(self.models) or None,
            "api": sorted(self.apis) or None,
            "endpoint": sorted(self.endpoints) or None,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "rate": self.rate,
            "seed": self.seed,
            "after_chunks": self.after_chunks,
            "after_fraction": self.after_fraction,
            "seen": self.seen,
            "fired": self.fired,
        }


class FaultBook:
    """The active fault rules; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []

    def add(
        self,
        kind: str,
        *,
        count: int | None = None,
        every: int | None = None,
        model: str | Sequence[str] | None = None,
        api: str | Sequence[str] | None = None,
        endpoint: str | Sequence[str] | None = None,
        retry_after: float | None = None,
        delay: float | None = None,
        rate: float | None = None,
        seed: int | None = None,
        after_chunks: int | None = None,
        after_fraction: float | None = None,
    ) -> FaultRule:
        """Validate and add a rule; raises `ValueError` on bad arguments."""
        if kind not in _KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(_KINDS)}")
        for name, value in (("count", count), ("every", every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        for name, number in (("retry_after", retry_after), ("delay", delay)):
            if number is not None and (
                isinstance(number, bool) or not isinstance(number, int | float) or number < 0
            ):
                raise ValueError(f"{name} must be a number >= 0")
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1
        ):
            raise ValueError("rate must be a number in (0, 1]")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        if after_chunks is not None and (
            isinstance(after_chunks, bool) or not isinstance(after_chunks, int) or after_chunks < 0
        ):
            raise ValueError("after_chunks must be an integer >= 0")
        if after_fraction is not None and (
            isinstance(after_fraction, bool)
            or not isinstance(after_fraction, int | float)
            or not 0 <= after_fraction <= 1
        ):
            raise ValueError("after_fraction must be a number in [0, 1]")
        if after_chunks is not None and after_fraction is not None:
            raise ValueError("give after_chunks or after_fraction, not both")
        if model is not None and not isinstance(model, str | list | tuple):
            raise ValueError("model must be a string or a list of strings")
        rule = FaultRule(
            kind=cast(FaultKind, kind),
            count=count,
            every=every,
            models=frozenset([model] if isinstance(model, str) else (model or ())),
            apis=_names(api, APIS, "api"),
            endpoints=_names(endpoint, tuple(ENDPOINTS), "endpoint"),
            # Defaults that make a bare rule useful: Retry-After 1 s, a 1 s stall.
            retry_after=(1.0 if retry_after is None else float(retry_after))
            if kind == "429"
            else retry_after,
            delay=(1.0 if delay is None else float(delay)) if kind == "slow" else delay,
            rate=None if rate is None else float(rate),
            seed=seed,
            after_chunks=after_chunks,
            after_fraction=None if after_fraction is None else float(after_fraction),
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[FaultRule]:
        """The rules still active."""
        with self._lock:
            return [r for r in self._rules if not r.exhausted]

    def pick(
        self, api: str, endpoint: str, model: str | None, streamed: bool = False
    ) -> FaultRule | None:
        """Count this call against every matching rule; return the first rule that fires."""
        chosen: FaultRule | None = None
        with self._lock:
            for rule in self._rules:
                if rule.exhausted or not rule.matches(api, endpoint, model, streamed):
                    continue
                rule.seen += 1
                due = rule.every is None or rule.seen % rule.every == 0
                # Every rate rule draws for every due call, so its sequence depends only on
                # its seed and the calls it matched, not on which other rule fired.
                if due and rule.draw() and chosen is None:
                    rule.fired += 1
                    chosen = rule
            self._rules = [r for r in self._rules if not r.exhausted]
        return chosen
