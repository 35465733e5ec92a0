"""Settings from the environment and flags, storage connection resolution, secrets."""

import pytest

from worker.config.redact import Redactor
from worker.config.settings import (
    DEV_STORAGE,
    SPECS,
    Settings,
    SettingsError,
    masked_url,
    redis_password,
)


def test_defaults_follow_the_spec() -> None:
    """With nothing set, the worker uses Azurite and the documented defaults."""
    settings = Settings.from_env({})
    assert settings.default_storage.connection_string == DEV_STORAGE
    assert settings.work_queues == ("assistant-requests", "assistant-runs", "assistant-deadlines")
    assert settings.concurrency == 16
    assert settings.max_dequeue_count == 5
    assert settings.visibility_timeout == 60
    assert settings.max_polling_interval == 10
    assert settings.run_timeout == 600
    assert settings.poll_backoff == (0.5, 1, 2, 3, 5)
    assert settings.chat_model == "gpt-4o-mini"
    assert settings.model_api == "chat"
    assert settings.message_encoding == "none"


def test_flags_override_the_environment() -> None:
    """A CLI flag wins over its environment variable."""
    settings = Settings.from_env({"WORKER_CONCURRENCY": "4"}, overrides={"concurrency": "2"})
    assert settings.concurrency == 2


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY (or --concurrency) must be at least 1"),
        ({"WORKER_CONCURRENCY": "many"}, "WORKER_CONCURRENCY"),
        ({"WORKER_REQUESTS_QUEUE": "Bad_Name"}, "valid Azure queue name"),
        ({"WORKER_REQUESTS_QUEUE": "a" * 57}, "at most 56 characters"),
        ({"WORKER_RUNS_QUEUE": "assistant-requests"}, "must differ"),
        ({"WORKER_MESSAGE_ENCODING": "utf7"}, "none, base64"),
        ({"WORKER_STORAGE_SETTINGS": "Other"}, "names 'Other'"),
        ({"WORKER_AI_CONNECTIONS": "east"}, "east__endpoint is not set"),
        ({"WORKER_MCP_SERVERS": "weather"}, "weather__url is not set"),
        ({"WORKER_MCP_SERVERS": "w", "w__url": "ftp://x"}, "w__url must be an http"),
        ({"WORKER_MCP_SERVERS": "w", "w__url": "https://u:p@x/mcp"}, "set w__token"),
        ({"WORKER_MCP_SERVERS": "a__b", "a__b__url": "http://x"}, "names 'a__b'"),
        ({"WORKER_MCP_SERVERS": "x" * 31, "x" * 31 + "__url": "http://x"}, "at most 30"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], fragment: str) -> None:
    """A bad setting stops the worker with a message naming the variable."""
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_identity_based_storage() -> None:
    """NAME__accountName selects identity-based access with the account's endpoints."""
    settings = Settings.from_env({"AzureWebJobsStorage__accountName": "acct"})
    storage = settings.default_storage
    assert storage.connection_string is None
    assert storage.queue_service_uri == "https://acct.queue.core.windows.net"
    assert storage.table_service_uri == "https://acct.table.core.windows.net"


def test_extra_storage_settings_are_allowed_by_name() -> None:
    """Only settings listed in WORKER_STORAGE_SETTINGS are resolved, besides the default."""
    settings = Settings.from_env(
        {"WORKER_STORAGE_SETTINGS": "Other", "Other": "UseDevelopmentStorage=true", "Unlisted": "x"}
    )
    assert set(settings.storage) == {"AzureWebJobsStorage", "Other"}


def test_secrets_are_collected_and_hidden_from_repr() -> None:
    """Account keys, SAS tokens and API keys are known to the redactor and never printed."""
    env = {
        "AzureWebJobsStorage": "AccountName=a;AccountKey=KEY123==;QueueEndpoint=http://x",
        "OPENAI_API_KEY": "sk-abc",
        "AZURE_OPENAI_KEY": "azkey",
        "WORKER_AI_CONNECTIONS": "east",
        "east__endpoint": "https://east",
        "east__key": "eastkey",
        "WORKER_MCP_SERVERS": "weather",
        "weather__url": "https://mcp.example.com/mcp",
        "weather__token": "mcp-token",
    }
    settings = Settings.from_env(env)
    assert set(settings.secrets()) == {"KEY123==", "sk-abc", "azkey", "eastkey", "mcp-token"}
    text = repr(settings)
    for secret in settings.secrets():
        assert secret not in text


QUERY_KEY = "query-key-0123456789"
OLD_QUERY_KEY = "older-query-key-9876543210"


def test_query_keys_are_secrets_without_a_flag() -> None:
    """WORKER_QUERY_KEYS: several keys (a rotation), spaces around them dropped; unset or
    empty, none (the query is not served). They are secrets: the redactor knows them, repr
    does not show them, and no CLI flag exists for them (a flag shows in the process list)."""
    settings = Settings.from_env({"WORKER_QUERY_KEYS": f" {QUERY_KEY} ,{OLD_QUERY_KEY}"})
    assert settings.query_keys == (QUERY_KEY, OLD_QUERY_KEY)
    assert {QUERY_KEY, OLD_QUERY_KEY} <= set(settings.secrets())
    assert QUERY_KEY not in repr(settings) and OLD_QUERY_KEY not in repr(settings)
    assert Settings.from_env({}).query_keys == ()
    assert Settings.from_env({"WORKER_QUERY_KEYS": "  "}).query_keys == ()
    assert "WORKER_QUERY_KEYS" not in {spec.env for spec in SPECS}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (f"{QUERY_KEY},", "empty key (key 2)"),
        (f"{QUERY_KEY},,{OLD_QUERY_KEY}", "empty key (key 2)"),
        ("short-key", "key 1 is shorter than 16 characters"),
        (f"{QUERY_KEY},{OLD_QUERY_KEY[:4]} {OLD_QUERY_KEY}", "key 2 holds a character"),
        ("päss-wörd-0123456789", "key 1 holds a character"),
    ],
)
def test_bad_query_keys_are_named_by_position_never_shown(value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"WORKER_QUERY_KEYS": value})
    message = str(raised.value)
    assert message.startswith("WORKER_QUERY_KEYS ") and fragment in message
    for part in value.split(","):
        if part.strip():
            assert part.strip() not in message


def test_mcp_servers_are_allowed_by_name() -> None:
    """Only the servers named in WORKER_MCP_SERVERS exist for the worker, each with its URL and
    optional token; another NAME__url in the environment is never read."""
    settings = Settings.from_env(
        {
            "WORKER_MCP_SERVERS": "weather, mail-1",
            "weather__url": "http://127.0.0.1:9000/mcp",
            "mail-1__url": "https://mail.example.com/mcp",
            "mail-1__token": " t0ken ",
            "other__url": "http://evil.example.com/mcp",
        }
    )
    assert set(settings.mcp_servers) == {"weather", "mail-1"}
    weather, mail = settings.mcp_servers["weather"], settings.mcp_servers["mail-1"]
    assert (weather.url, weather.token) == ("http://127.0.0.1:9000/mcp", None)
    assert (mail.url, mail.token) == ("https://mail.example.com/mcp", "t0ken")
    assert "t0ken" not in repr(settings)
    assert Settings.from_env({}).mcp_servers == {}


def test_streaming_settings_and_the_redis_password() -> None:
    """The coalescing interval and the Redis URL: its password is a secret (masked in texts
    that leave the worker, absent from repr), refused as a flag (a process list shows flags)."""
    assert Settings.from_env({}).stream_interval_ms == 250
    assert Settings.from_env({}).stream_redis_url is None
    url = "rediss://:s3cr3t-pw@cache.example.net:6380/0"
    settings = Settings.from_env(
        {"WORKER_STREAM_REDIS_URL": url, "WORKER_STREAM_INTERVAL_MS": "100"}
    )
    assert settings.stream_interval_ms == 100
    assert settings.stream_redis_url == url
    assert "s3cr3t-pw" in settings.secrets()
    assert "s3cr3t-pw" not in repr(settings)
    assert masked_url(url) == "rediss://:***@cache.example.net:6380/0"
    assert Redactor(settings.secrets())(f"cannot reach {url}") == (
        "cannot reach rediss://:***@cache.example.net:6380/0"
    )
    assert redis_password("redis://localhost:6379/0?password=q%40w") == "q@w"
    with pytest.raises(SettingsError, match="must not hold a password"):
        Settings.from_env({}, overrides={"stream_redis_url": url})
    flagged = Settings.from_env({}, overrides={"stream_redis_url": "redis://127.0.0.1:6379/0"})
    assert flagged.stream_redis_url == "redis://127.0.0.1:6379/0"
    for bad, fragment in (
        ({"WORKER_STREAM_INTERVAL_MS": "5"}, "between 10 and 60000"),
        ({"WORKER_STREAM_REDIS_URL": "http://cache"}, "redis://"),
    ):
        with pytest.raises(SettingsError, match=fragment):
            Settings.from_env(bad)


SECRET = "whsec_" + "c2VjcmV0LWtleS1vZi10aGUtd2ViaG9va3M="  # base64 of a made-up key


def test_webhooks_are_off_by_default_and_polls_keep_their_schedule() -> None:
    """Without WORKER_WEBHOOK_SECRETS there is no webhook route and every backend polls on
    WORKER_POLL_BACKOFF; with it, background responses are polled on the sparse safety net."""
    settings = Settings.from_env({})
    assert not settings.webhooks
    assert settings.webhook_poll_backoff == (10, 30, 60)
    assert settings.poll_schedule("responses") == settings.poll_backoff
    on = Settings.from_env({"WORKER_WEBHOOK_SECRETS": SECRET, "WORKER_HTTP_PORT": "0"})
    assert on.webhooks and on.webhook_secrets == (SECRET,)
    assert on.poll_schedule("responses") == (10, 30, 60)
    # The Assistants API sends no webhooks: its runs keep the usual schedule.
    assert on.poll_schedule("assistants") == on.poll_backoff


def test_webhook_secrets_are_masked_and_checked_without_showing_them() -> None:
    """Several secrets (rotation) are read; each is known to the redactor (with and without
    its prefix) and never printed; a malformed one names the variable, not the value; the
    route needs a port to be served on."""
    other = "whsec_" + "b3RoZXIta2V5"
    settings = Settings.from_env(
        {"WORKER_WEBHOOK_SECRETS": f"{SECRET}, {other}", "WORKER_WEBHOOK_PORT": "8081"}
    )
    assert settings.webhook_secrets == (SECRET, other)
    assert {SECRET, other, SECRET.removeprefix("whsec_")} <= set(settings.secrets())
    assert SECRET not in repr(settings)
    with pytest.raises(SettingsError, match="WORKER_WEBHOOK_SECRETS") as error:
        Settings.from_env({"WORKER_WEBHOOK_SECRETS": "whsec_not base64!", "WORKER_HTTP_PORT": "1"})
    assert "not base64" not in str(error.value)
    with pytest.raises(SettingsError, match="WORKER_HTTP_PORT or WORKER_WEBHOOK_PORT"):
        Settings.from_env({"WORKER_WEBHOOK_SECRETS": SECRET})
