"""What the operator configured: the settings read once from the environment
(``settings.py``), and the masking of the secrets they hold (``redact.py``)."""
