"""Runs: the pure state machine, the model-facing history, and their values."""
