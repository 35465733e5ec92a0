"""Secrets are masked wherever text leaves the worker."""

from worker.config.redact import MASK, Redactor


def test_known_secret_values_are_masked() -> None:
    """Configured secrets are masked wherever they appear."""
    redact = Redactor(["s3cr3t-value"])
    assert redact("failed with key s3cr3t-value!") == f"failed with key {MASK}!"


def test_secret_patterns_are_masked_without_being_configured() -> None:
    """Connection-string keys, SAS signatures, bearer tokens and API keys are masked."""
    redact = Redactor()
    text = redact(
        "AccountName=a;AccountKey=abc+/==;Endpoint=x https://h/q?sv=1&sig=abc%2F&se=2 "
        "Authorization: Bearer eyJhbGciOi.J9 api-key: 0123456789 sk-proj-abcdefghij"
    )
    for secret in ("abc+/==", "abc%2F", "eyJhbGciOi.J9", "0123456789", "sk-proj-abcdefghij"):
        assert secret not in text
    assert "AccountName=a" in text
    assert "sv=1" in text


def test_text_without_secrets_is_unchanged() -> None:
    """Ordinary messages pass through."""
    assert Redactor(["zzzz"])("chat 'a' created") == "chat 'a' created"
