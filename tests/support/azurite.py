"""Azurite for tests: the launcher lives in ``worker.devtools.azurite`` (``make run`` uses it too)."""

from worker.devtools.azurite import (
    AZURITE_BIN,
    DEV_ACCOUNT_KEY,
    DEV_ACCOUNT_NAME,
    HOST,
    REPO_ROOT,
    Azurite,
    AzuriteNotInstalledError,
    build_connection_string,
    find_azurite_binary,
)

__all__ = [
    "AZURITE_BIN",
    "DEV_ACCOUNT_KEY",
    "DEV_ACCOUNT_NAME",
    "HOST",
    "REPO_ROOT",
    "Azurite",
    "AzuriteNotInstalledError",
    "build_connection_string",
    "find_azurite_binary",
]
