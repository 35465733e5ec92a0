"""Settings: read once from the environment at start, into one frozen object passed down.

The names follow the Azure Functions host and the OpenAI extension so that existing app
settings carry over. Every setting in ``SPECS`` is also a CLI flag of ``assistant-worker run``.
Nothing here runs at import time.
"""

import base64
import binascii
import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from schemas.names import MAX_BASE_QUEUE_NAME_LENGTH, check_queue_name
from schemas.requests import DEFAULT_STORAGE_SETTING

DEV_STORAGE = "UseDevelopmentStorage=true"
# No key is needed for an OpenAI-compatible server that asks for none (the shipped fake).
NO_MODEL_ENDPOINT = (
    "no model endpoint is configured: set OPENAI_BASE_URL (an OpenAI-compatible server; "
    "add OPENAI_API_KEY if it asks for a key), OPENAI_API_KEY alone (api.openai.com), or "
    "AZURE_OPENAI_ENDPOINT (Azure OpenAI)"
)


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable, never its value."""


@dataclass(frozen=True)
class StorageConnection:
    """How to reach one storage account: a connection string, or identity-based URIs."""

    setting: str
    connection_string: str | None = field(default=None, repr=False)
    account_name: str | None = None
    queue_service_uri: str | None = None
    table_service_uri: str | None = None

    def secrets(self) -> list[str]:
        """The parts of the connection string that must never be logged."""
        if not self.connection_string:
            return []
        found = []
        for part in self.connection_string.split(";"):
            key, _, value = part.partition("=")
            if key.strip().lower() in {"accountkey", "sharedaccesssignature"} and value:
                found.append(value.strip())
        return found


def storage_connection(setting: str, env: Mapping[str, str]) -> StorageConnection | None:
    """Resolve a storage connection the way the Functions host does.

    ``NAME`` holds a connection string; otherwise ``NAME__accountName`` or
    ``NAME__queueServiceUri`` / ``NAME__tableServiceUri`` select identity-based access.
    """
    value = env.get(setting) or env.get(f"ConnectionStrings__{setting}")
    if value:
        return StorageConnection(setting=setting, connection_string=value)
    account = env.get(f"{setting}__accountName")
    queue_uri = env.get(f"{setting}__queueServiceUri")
    table_uri = env.get(f"{setting}__tableServiceUri")
    if account:
        queue_uri = queue_uri or f"https://{account}.queue.core.windows.net"
        table_uri = table_uri or f"https://{account}.table.core.windows.net"
    if queue_uri or table_uri:
        return StorageConnection(
            setting=setting,
            account_name=account,
            queue_service_uri=queue_uri,
            table_service_uri=table_uri,
        )
    return None


@dataclass(frozen=True)
class AIConnection:
    """A named model endpoint that a request may select with ``aiConnectionName``."""

    name: str
    endpoint: str
    key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class McpServerConfig:
    """An MCP server assistants may use (SPEC §5.5), by the name an operator gave it in
    ``WORKER_MCP_SERVERS``: where it is, and the bearer token the worker sends it."""

    name: str
    url: str
    token: str | None = field(default=None, repr=False)


# An MCP server's name prefixes its tools' function names (``{server}__{tool}``): letters,
# digits and single ``_`` or ``-`` (never ``__``, so the function name splits one way only),
# short enough to leave the tool most of OpenAI's 64 characters.
MCP_SERVER_NAME = re.compile(r"^[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*$")
MAX_MCP_SERVER_NAME = 30


def mcp_server(name: str, env: Mapping[str, str]) -> McpServerConfig:
    """The MCP server named ``name`` in ``WORKER_MCP_SERVERS``: ``NAME__url`` (required,
    http or https) and ``NAME__token`` (optional, sent as ``Authorization: Bearer``)."""
    if not MCP_SERVER_NAME.match(name) or len(name) > MAX_MCP_SERVER_NAME:
        raise SettingsError(
            f"WORKER_MCP_SERVERS names {name!r}: a server name is letters and digits, joined "
            f"by single '_' or '-', at most {MAX_MCP_SERVER_NAME} characters"
        )
    url = (env.get(f"{name}__url") or "").strip()
    if not url:
        raise SettingsError(f"WORKER_MCP_SERVERS names {name!r}, but {name}__url is not set")
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SettingsError(f"{name}__url must be an http:// or https:// URL")
    if parsed.username or parsed.password:
        # A credential in the URL would travel into logs and traces: it belongs in the token.
        raise SettingsError(f"{name}__url must not hold credentials; set {name}__token")
    token = (env.get(f"{name}__token") or "").strip() or None
    return McpServerConfig(name, url, token)


def _number(text: str) -> float:
    """A finite number, or a ValueError that says so (not Python's ``float()`` text)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number (of seconds), not {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {text!r}")
    return value


def _whole(text: str) -> int:
    """A whole number, or a ValueError that says so (not Python's ``int()`` text)."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be a whole number, not {text!r}") from None


def _seconds(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_seconds(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


def _lease_seconds(text: str) -> float:
    value = _number(text)
    if not 1 <= value <= 7 * 24 * 3600:
        raise ValueError("must be between 1 s and 7 days (Azure's visibility timeout range)")
    return value


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _optional_port(text: str) -> int | None:
    if not text:
        return None
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number")
    return value


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a host name or IP address")
    return text


def _seconds_list(text: str) -> tuple[float, ...]:
    values = tuple(_seconds(part) for part in text.split(",") if part.strip())
    if not values:
        raise ValueError("must list at least one delay")
    return values


def webhook_secrets(text: str) -> tuple[str, ...]:
    """Signing secrets of the provider's webhooks: ``whsec_`` and Base64 (OpenAI and Azure
    OpenAI show them so), comma-separated, several while one is rotated out."""
    secrets = _names(text)
    for secret in secrets:
        body = secret.removeprefix("whsec_")
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not key:
            # Never the value itself: it is a secret.
            raise ValueError("must list signing secrets of the form whsec_<base64>")
    return secrets


def _optional_text(text: str) -> str | None:
    return text or None


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _base_queue_name(text: str) -> str:
    check_queue_name(text)
    if text.endswith("-poison"):
        raise ValueError("must not be a '-poison' queue (the worker would consume dead letters)")
    if len(text) > MAX_BASE_QUEUE_NAME_LENGTH:
        raise ValueError(
            f"must be at most {MAX_BASE_QUEUE_NAME_LENGTH} characters, so that its "
            "'-poison' queue name is valid"
        )
    return text


def _interval_ms(text: str) -> int:
    value = int(text)
    if not 10 <= value <= 60_000:
        raise ValueError("must be between 10 and 60000 milliseconds")
    return value


def _redis_url(text: str) -> str | None:
    if not text:
        return None
    parsed = urlsplit(text)
    if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return text


def redis_password(url: str | None) -> str | None:
    """The password a Redis URL holds, if any (a secret: masked wherever text leaves)."""
    if not url:
        return None
    parsed = urlsplit(url)
    password = parsed.password
    if password is None:
        password = parse_qs(parsed.query).get("password", [None])[0]
    return unquote(password) if password else None


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and errors)."""
    parsed = urlsplit(url)
    if parsed.password is None:
        return url
    user = parsed.username or ""
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return urlunsplit(parsed._replace(netloc=f"{user}:***@{host}{port}"))


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of: {', '.join(allowed)}")
        return text

    return parse


def _switch(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


# A query key is a bearer secret: long enough not to be guessed, and only characters a header
# carries as they are (visible ASCII) and that cannot split the list (no comma).
MIN_QUERY_KEY_LENGTH = 16
_QUERY_KEY_CHARACTERS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {","}


def query_keys(text: str) -> tuple[str, ...]:
    """The keys of ``WORKER_QUERY_KEYS`` (comma-separated; several during a rotation).

    The errors say which key (by position) is wrong and why, never the key itself.
    """
    if not text.strip():
        return ()
    keys = tuple(part.strip() for part in text.split(","))
    for position, key in enumerate(keys, start=1):
        if not key:
            raise ValueError(f"lists an empty key (key {position}); separate keys with one comma")
        if len(key) < MIN_QUERY_KEY_LENGTH:
            raise ValueError(
                f"key {position} is shorter than {MIN_QUERY_KEY_LENGTH} characters "
                "(generate one with: openssl rand -base64 32)"
            )
        if not set(key) <= _QUERY_KEY_CHARACTERS:
            raise ValueError(
                f"key {position} holds a character other than visible ASCII (no spaces, no commas)"
            )
    return keys


@dataclass(frozen=True)
class SettingSpec:
    """One tunable: its environment variable, its field, how to parse it, and its help."""

    env: str
    field: str
    parse: Callable[[str], Any]
    default: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SPECS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "WORKER_REQUESTS_QUEUE",
        "requests_queue",
        _base_queue_name,
        "assistant-requests",
        "queue that producers send requests to",
    ),
    SettingSpec(
        "WORKER_RUNS_QUEUE",
        "runs_queue",
        _base_queue_name,
        "assistant-runs",
        "queue of the worker's own run-step continuations",
    ),
    SettingSpec(
        "WORKER_DEADLINES_QUEUE",
        "deadlines_queue",
        _base_queue_name,
        "assistant-deadlines",
        "queue of the worker's own run deadlines (one delayed watchdog message per run)",
    ),
    SettingSpec(
        "WORKER_MESSAGE_ENCODING",
        "message_encoding",
        _choice("none", "base64"),
        "none",
        "how the worker writes messages: 'none' (plain JSON) or 'base64'",
    ),
    SettingSpec(
        "WORKER_CONCURRENCY",
        "concurrency",
        _positive_int,
        "16",
        "messages processed at once by this process",
    ),
    SettingSpec(
        "WORKER_MAX_DEQUEUE_COUNT",
        "max_dequeue_count",
        _positive_int,
        "5",
        "attempts before a message is dead-lettered",
    ),
    SettingSpec(
        "WORKER_VISIBILITY_TIMEOUT",
        "visibility_timeout",
        _seconds,
        "60",
        "seconds of lease taken on receive; renewed at half-life while a handler runs",
    ),
    SettingSpec(
        "WORKER_MAX_POLLING_INTERVAL",
        "max_polling_interval",
        _seconds,
        "10",
        "cap, in seconds, of the requests queue's idle backoff (the runs queue: twice it, the "
        "deadlines queue: six times it, at most 60 s); for 35 s after a message the worker "
        "polls every 0.2 s",
    ),
    SettingSpec(
        "WORKER_RETRY_DELAY",
        "retry_delay",
        _seconds,
        "2",
        "first delay, in seconds, before a transient failure is retried (doubles each attempt)",
    ),
    SettingSpec(
        "WORKER_RETRY_MAX_DELAY",
        "retry_max_delay",
        _seconds,
        "300",
        "cap, in seconds, of the retry delay",
    ),
    SettingSpec(
        "WORKER_SHUTDOWN_GRACE",
        "shutdown_grace",
        _seconds,
        "25",
        "seconds that in-flight messages get to finish after SIGTERM",
    ),
    SettingSpec(
        "WORKER_RUN_TIMEOUT",
        "run_timeout",
        _seconds,
        "600",
        "seconds after which an unfinished run becomes 'expired'",
    ),
    SettingSpec(
        "WORKER_STEP_TIMEOUT",
        "step_timeout",
        _positive_seconds,
        "900",
        "seconds one message's handler, or one step taken in-process, may run before it is "
        "abandoned and retried (model calls and tools have their own, shorter timeouts)",
    ),
    SettingSpec(
        "WORKER_CREATE_GRACE",
        "create_grace",
        _seconds,
        "120",
        "seconds after it was enqueued that a post or submit for a chat that does not exist "
        "(yet) is retried before it is dead-lettered",
    ),
    SettingSpec(
        "WORKER_CACHE_MB",
        "cache_mb",
        _non_negative_int,
        "64",
        "memory budget, in MiB, for what the worker caches (chat histories, last commits, "
        "table clients); least recently used first out; 0: cache no chat",
    ),
    SettingSpec(
        "WORKER_IN_PROCESS_STEPS",
        "in_process_steps",
        _switch,
        "true",
        "take a run's steps that are due at once in the worker that holds the run, without a "
        "queue hop (false: every step goes through the runs queue)",
    ),
    SettingSpec(
        "WORKER_POLL_BACKOFF",
        "poll_backoff",
        _seconds_list,
        "0.5,1,2,3,5",
        "delays, in seconds, between polls of a pending backend run (the last repeats)",
    ),
    SettingSpec(
        "WORKER_STREAM_INTERVAL_MS",
        "stream_interval_ms",
        _interval_ms,
        "250",
        "how often, in milliseconds, streamed text is flushed as an assistantDelta event",
    ),
    SettingSpec(
        "WORKER_STREAM_REDIS_URL",
        "stream_redis_url",
        _redis_url,
        "",
        "a Redis URL: streamed events go to a Redis stream per request instead of the "
        "replyTo queue (a password only in the environment, never as a flag)",
    ),
    SettingSpec(
        "WORKER_WEBHOOK_POLL_BACKOFF",
        "webhook_poll_backoff",
        _seconds_list,
        "10,30,60",
        "delays, in seconds, between the safety-net polls of a background response while "
        "webhooks are on (WORKER_WEBHOOK_SECRETS; the last repeats)",
    ),
    SettingSpec(
        "CHAT_MODEL_DEPLOYMENT_NAME",
        "chat_model",
        str,
        "gpt-4o-mini",
        "default model or deployment name",
    ),
    SettingSpec(
        "WORKER_MODEL_API",
        "model_api",
        _choice("chat", "responses", "assistants"),
        "chat",
        "default model API: chat, responses or assistants (legacy: the Assistants API was "
        "sunset on 2026-08-26; new deployments use responses)",
    ),
    SettingSpec(
        "WORKER_TOOLS",
        "tool_modules",
        _names,
        "",
        "comma-separated modules whose @tool functions are registered",
    ),
    SettingSpec(
        "WORKER_STORAGE_SETTINGS",
        "storage_setting_names",
        _names,
        "",
        "comma-separated extra storage connection settings requests may name",
    ),
    SettingSpec(
        "WORKER_AI_CONNECTIONS",
        "ai_connection_names",
        _names,
        "",
        "comma-separated named AI connections requests may select",
    ),
    SettingSpec(
        "WORKER_MCP_SERVERS",
        "mcp_server_names",
        _names,
        "",
        "comma-separated names of the MCP servers assistants may use (each NAME has NAME__url "
        "and optionally NAME__token)",
    ),
    SettingSpec(
        "WORKER_HTTP_PORT",
        "http_port",
        _optional_port,
        "",
        "if set, port of the health, metrics and query HTTP server",
    ),
    SettingSpec(
        "WORKER_HTTP_HOST",
        "http_host",
        _host,
        "0.0.0.0",
        "address the HTTP server listens on (with WORKER_HTTP_PORT)",
    ),
    SettingSpec(
        "WORKER_WEBHOOK_PORT",
        "webhook_port",
        _optional_port,
        "",
        "if set (with WORKER_WEBHOOK_SECRETS), POST /webhooks/openai is served on this port "
        "alone (for an ingress that must expose nothing else) instead of WORKER_HTTP_PORT",
    ),
    SettingSpec(
        "OPENAI_BASE_URL",
        "openai_base_url",
        _optional_text,
        "",
        "an OpenAI-compatible server (vLLM, llama.cpp, Ollama); default: OpenAI",
    ),
    SettingSpec(
        "AZURE_OPENAI_ENDPOINT",
        "azure_openai_endpoint",
        _optional_text,
        "",
        "Azure OpenAI endpoint (its v1 API; the model is the deployment name)",
    ),
    SettingSpec(
        "OPENAI_API_VERSION",
        "openai_api_version",
        _optional_text,
        "",
        "use Azure OpenAI's dated API with this api-version instead of v1",
    ),
    SettingSpec(
        "WORKER_LOG_FORMAT",
        "log_format",
        _choice("auto", "json", "console"),
        "auto",
        "log renderer: json, console, or auto (console on a terminal)",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Everything the worker is configured with. Build it with ``Settings.from_env()``."""

    storage: dict[str, StorageConnection]
    requests_queue: str = "assistant-requests"
    runs_queue: str = "assistant-runs"
    deadlines_queue: str = "assistant-deadlines"
    message_encoding: Literal["none", "base64"] = "none"
    concurrency: int = 16
    max_dequeue_count: int = 5
    visibility_timeout: float = 60.0
    max_polling_interval: float = 10.0
    retry_delay: float = 2.0
    retry_max_delay: float = 300.0
    shutdown_grace: float = 25.0
    run_timeout: float = 600.0
    step_timeout: float = 900.0
    create_grace: float = 120.0
    cache_mb: int = 64
    in_process_steps: bool = True
    poll_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0)
    stream_interval_ms: int = 250
    # Holds a password when the Redis server wants one: never shown (masked_url).
    stream_redis_url: str | None = field(default=None, repr=False)
    webhook_poll_backoff: tuple[float, ...] = (10.0, 30.0, 60.0)
    chat_model: str = "gpt-4o-mini"
    model_api: str = "chat"
    tool_modules: tuple[str, ...] = ()
    storage_setting_names: tuple[str, ...] = ()
    ai_connection_names: tuple[str, ...] = ()
    mcp_server_names: tuple[str, ...] = ()
    http_port: int | None = None
    http_host: str = "0.0.0.0"
    webhook_port: int | None = None
    log_format: str = "auto"
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    azure_openai_endpoint: str | None = None
    azure_openai_api_key: str | None = field(default=None, repr=False)
    openai_api_version: str | None = None
    ai_connections: dict[str, AIConnection] = field(default_factory=dict)
    # WORKER_QUERY_KEYS: a secret, so no CLI flag (a flag shows in the process list).
    query_keys: tuple[str, ...] = field(default=(), repr=False)
    mcp_servers: dict[str, McpServerConfig] = field(default_factory=dict)
    # Signing secrets of POST /webhooks/openai (none: the route is off). No flag: a secret.
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> "Settings":
        """Read the settings; ``overrides`` (CLI flags) win over the environment."""
        env = dict(os.environ if env is None else env)
        overrides = overrides or {}
        values: dict[str, Any] = {}
        for spec in SPECS:
            raw = overrides.get(spec.field, env.get(spec.env, spec.default))
            try:
                values[spec.field] = spec.parse(raw.strip())
            except ValueError as error:
                raise SettingsError(f"{spec.env} (or {spec.flag}) {error}") from None
        if redis_password(overrides.get("stream_redis_url")):
            # A flag is visible to every user of the machine (ps, /proc): secrets stay in the
            # environment.
            raise SettingsError(
                "--stream-redis-url must not hold a password: set WORKER_STREAM_REDIS_URL in "
                "the environment instead"
            )
        names = [values["requests_queue"], values["runs_queue"], values["deadlines_queue"]]
        if len(set(names)) != len(names):
            raise SettingsError(
                "WORKER_REQUESTS_QUEUE, WORKER_RUNS_QUEUE and WORKER_DEADLINES_QUEUE must differ"
            )

        storage: dict[str, StorageConnection] = {}
        default = storage_connection(DEFAULT_STORAGE_SETTING, env)
        storage[DEFAULT_STORAGE_SETTING] = default or StorageConnection(
            DEFAULT_STORAGE_SETTING, connection_string=DEV_STORAGE
        )
        for name in values["storage_setting_names"]:
            connection = storage_connection(name, env)
            if connection is None:
                raise SettingsError(
                    f"WORKER_STORAGE_SETTINGS names {name!r}, but neither {name} nor "
                    f"{name}__accountName / {name}__tableServiceUri is set"
                )
            storage[name] = connection

        ai_connections = {}
        for name in values["ai_connection_names"]:
            endpoint = env.get(f"{name}__endpoint")
            if not endpoint:
                raise SettingsError(
                    f"WORKER_AI_CONNECTIONS names {name!r}, but {name}__endpoint is not set"
                )
            ai_connections[name] = AIConnection(name, endpoint, env.get(f"{name}__key"))

        try:
            keys = query_keys(env.get("WORKER_QUERY_KEYS", ""))
        except ValueError as error:
            raise SettingsError(f"WORKER_QUERY_KEYS {error}") from None
        try:
            secrets = webhook_secrets(env.get("WORKER_WEBHOOK_SECRETS") or "")
        except ValueError as error:
            raise SettingsError(f"WORKER_WEBHOOK_SECRETS {error}") from None
        if secrets and values["http_port"] is None and values["webhook_port"] is None:
            raise SettingsError(
                "WORKER_WEBHOOK_SECRETS needs WORKER_HTTP_PORT or WORKER_WEBHOOK_PORT: the "
                "webhook route is served on one of them"
            )
        mcp_servers = {name: mcp_server(name, env) for name in values["mcp_server_names"]}

        return cls(
            storage=storage,
            query_keys=keys,
            webhook_secrets=secrets,
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            azure_openai_api_key=(
                env.get("AZURE_OPENAI_API_KEY") or env.get("AZURE_OPENAI_KEY") or None
            ),
            ai_connections=ai_connections,
            mcp_servers=mcp_servers,
            **values,
        )

    @property
    def work_queues(self) -> tuple[str, str, str]:
        """The queues the worker consumes."""
        return (self.requests_queue, self.runs_queue, self.deadlines_queue)

    @property
    def webhooks(self) -> bool:
        """Whether the provider's webhooks are taken (``POST /webhooks/openai``)."""
        return bool(self.webhook_secrets)

    def poll_schedule(self, api: str) -> tuple[float, ...]:
        """The delays between polls of a pending run on ``api``: background responses are
        polled only as a safety net while their webhooks are taken (SPEC §5.1)."""
        if api == "responses" and self.webhooks:
            return self.webhook_poll_backoff
        return self.poll_backoff

    @property
    def default_storage(self) -> StorageConnection:
        """The ``AzureWebJobsStorage`` account: the work queues live there."""
        return self.storage[DEFAULT_STORAGE_SETTING]

    @property
    def default_storage_setting(self) -> str:
        """The name of the setting of the worker's own storage account."""
        return DEFAULT_STORAGE_SETTING

    @property
    def model_endpoint_missing(self) -> str | None:
        """Why no run can reach a model with these settings (None: the default endpoint is
        configured). A worker says so at start, and each run that needs it fails with it."""
        if self.azure_openai_endpoint or self.openai_base_url or self.openai_api_key:
            return None
        return NO_MODEL_ENDPOINT

    def with_values(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (tests, the demo)."""
        return dataclasses.replace(self, **changes)

    def secrets(self) -> list[str]:
        """Every configured secret value, for the log and error redactor."""
        found: list[str] = []
        for connection in self.storage.values():
            found.extend(connection.secrets())
        for ai in self.ai_connections.values():
            if ai.key:
                found.append(ai.key)
        for server in self.mcp_servers.values():
            if server.token:
                found.append(server.token)
        for value in (
            self.openai_api_key,
            self.azure_openai_api_key,
            redis_password(self.stream_redis_url),
        ):
            if value:
                found.append(value)
        found.extend(self.query_keys)
        found.extend(self.webhook_secrets)
        # The key without its prefix is the same secret.
        found.extend(secret.removeprefix("whsec_") for secret in self.webhook_secrets)
        return found
