"""Tools for development and tests: a local Azurite launcher."""
