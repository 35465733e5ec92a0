"""One ``openai.AsyncOpenAI`` per (endpoint, credential), cached and closed on shutdown.

- OpenAI or any OpenAI-compatible server: ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL``.
- Azure OpenAI: ``AZURE_OPENAI_ENDPOINT`` through the v1 path (``{endpoint}/openai/v1/``, the
  model is the deployment name) with ``AZURE_OPENAI_API_KEY``, or an Entra token provider
  (on the process's one ``DefaultAzureCredential``, see ``worker.connections.clients``) when no key
  is set; the dated ``api-version`` paths only when ``OPENAI_API_VERSION`` is set.
- Named connections (``aiConnectionName``): ``<name>__endpoint`` / ``<name>__key``, Azure-style.
The SDK's own retries are kept small: long waits go back to the queue as delayed steps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.config.settings import NO_MODEL_ENDPOINT, Settings
from worker.connections.clients import shared_credential

if TYPE_CHECKING:
    import openai

# No SDK retries: it would sleep out a 429's Retry-After (up to 120 s) inside the handler;
# the worker re-sends the step with that delay instead (SPEC §5: never sleep on a run).
SDK_MAX_RETRIES = 0
REQUEST_TIMEOUT = 120.0
AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
# Clients kept (about 30 KB each). Their keys come from configuration only (an unknown
# aiConnectionName is refused before any client is built), so a sane configuration never
# reaches this; the bound keeps it so whatever the configuration.
MAX_MODEL_CLIENTS = 16


class ModelNotConfigured(Exception):
    """No model endpoint is configured for what a run asks."""


class ModelClients:
    """The clients of the configured endpoints, built on first use."""

    def __init__(self, settings: Settings, max_clients: int = MAX_MODEL_CLIENTS) -> None:
        self._settings = settings
        self._max_clients = max(1, max_clients)
        self._clients: OrderedDict[tuple[str, str], openai.AsyncOpenAI] = OrderedDict()
        self._token_provider_: Callable[[], Any] | None = None

    def client(self, ai_connection: str | None = None) -> openai.AsyncOpenAI:
        """The client for a request's ``aiConnectionName`` (None: the default endpoint)."""
        import openai  # loaded with the first model call, not at start-up

        settings = self._settings
        if ai_connection:
            named = settings.ai_connections.get(ai_connection)
            if named is None:
                raise ModelNotConfigured(f"aiConnectionName {ai_connection!r} is not configured")
            return self._azure(named.endpoint, named.key, key_name=f"named:{ai_connection}")
        if settings.azure_openai_endpoint:
            return self._azure(
                settings.azure_openai_endpoint, settings.azure_openai_api_key, key_name="azure"
            )
        if settings.openai_api_key or settings.openai_base_url:
            base_url = settings.openai_base_url or "https://api.openai.com/v1"
            return self._cached(
                (base_url, "openai"),
                lambda: openai.AsyncOpenAI(
                    api_key=settings.openai_api_key or "not-needed",
                    base_url=base_url,
                    max_retries=SDK_MAX_RETRIES,
                    timeout=REQUEST_TIMEOUT,
                ),
            )
        raise ModelNotConfigured(NO_MODEL_ENDPOINT)

    def connection_names(self) -> list[str]:
        """The named AI connections (``WORKER_AI_CONNECTIONS``)."""
        return list(self._settings.ai_connections)

    def _azure(self, endpoint: str, key: str | None, *, key_name: str) -> openai.AsyncOpenAI:
        import openai

        endpoint = endpoint.rstrip("/")
        api_key: Any = key if key else self._token_provider()
        version = self._settings.openai_api_version
        if version:
            return self._cached(
                (endpoint, key_name + ":dated"),
                lambda: openai.AsyncAzureOpenAI(
                    azure_endpoint=endpoint,
                    api_version=version,
                    **({"api_key": key} if key else {"azure_ad_token_provider": api_key}),
                    max_retries=SDK_MAX_RETRIES,
                    timeout=REQUEST_TIMEOUT,
                ),
            )
        return self._cached(
            (endpoint, key_name),
            lambda: openai.AsyncOpenAI(
                base_url=f"{endpoint}/openai/v1/",
                api_key=api_key,
                max_retries=SDK_MAX_RETRIES,
                timeout=REQUEST_TIMEOUT,
            ),
        )

    def _token_provider(self) -> Callable[[], Any]:
        # Called before each request, so Entra tokens refresh without rebuilding the client.
        # One provider, on the process's one credential (closed by the app, not here).
        if self._token_provider_ is None:
            from azure.identity.aio import get_bearer_token_provider

            self._token_provider_ = get_bearer_token_provider(shared_credential(), AZURE_SCOPE)
        return self._token_provider_

    def _cached(
        self, key: tuple[str, str], build: Callable[[], openai.AsyncOpenAI]
    ) -> openai.AsyncOpenAI:
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        client = self._clients[key] = build()
        while len(self._clients) > self._max_clients:
            # Not closed here: a model call may still be using it ("not usable after close").
            # The SDK's HTTP client closes itself once the last call holding it lets go.
            self._clients.popitem(last=False)
        return client

    def cached(self) -> int:
        """How many clients are kept."""
        return len(self._clients)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        self._token_provider_ = None
