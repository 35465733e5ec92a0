"""assistant-worker runtime: settings, queue transport, the worker loop, storage, and the CLI."""

__version__ = "0.1.0"
