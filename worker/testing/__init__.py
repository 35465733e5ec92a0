"""Test doubles shipped with the worker: `FakeOpenAI`, a fake OpenAI-compatible server.

`FakeOpenAI` is imported lazily so that `python -m worker.testing.fake_openai` does not import
its own module twice (once through this package, once as `__main__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.testing.fake_openai import FakeOpenAI, RecordedRequest

__all__ = ["FakeOpenAI", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker.testing import fake_openai

        return getattr(fake_openai, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
