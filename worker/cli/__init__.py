"""The ``assistant-worker`` command line."""
