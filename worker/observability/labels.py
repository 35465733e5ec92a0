"""Bounded label values (SPEC §10): a value taken from a request never makes a new series.

A request may name any ``chatModel``; each distinct value as a Prometheus label is a new time
series (memory in the worker and in every scraper), and as a span name a new operation in the
trace backend. ``BoundedLabels`` keeps the configured default and the first ``limit`` other
values this process sees; every later value, and any value no model name looks like (too long,
control characters), is ``other``. Pure: no I/O, one instance per process shared by the
metrics and the traces, so that both name the same values.
"""

from collections.abc import Iterable

OTHER = "other"
# Values kept besides the configured default, first seen first.
MAX_KEPT_VALUES = 10
# A model or deployment name is short (Azure allows 64 characters); a longer value is other.
MAX_LABEL_CHARS = 128


class BoundedLabels:
    """``labels(value)``: ``value`` itself if it is one of the kept values (or can still be
    kept), else ``OTHER``."""

    def __init__(self, defaults: Iterable[str | None] = (), limit: int = MAX_KEPT_VALUES) -> None:
        self._defaults = frozenset(value for value in defaults if value)
        self._kept: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._defaults or value in self._kept:
            return value
        if len(self._kept) >= self._limit or not _plausible(value):
            return OTHER
        self._kept.add(value)
        return value

    @property
    def kept(self) -> frozenset[str]:
        """The values kept so far besides the defaults."""
        return frozenset(self._kept)


def _plausible(value: str) -> bool:
    return 0 < len(value) <= MAX_LABEL_CHARS and value.isprintable() and value != OTHER
