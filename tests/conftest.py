"""Shared fixtures: one Azurite per test session, and a fresh set of queues per test."""

from collections.abc import Iterator

import pytest

from tests.support.azurite import Azurite
from tests.support.env import StorageEnv


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite on free ports with a temporary data folder; stopped even when tests fail."""
    with Azurite() as server:
        yield server


@pytest.fixture
def storage(azurite: Azurite) -> StorageEnv:
    """Queue and table names of this test only, on the session's Azurite."""
    return StorageEnv.fresh(azurite)
