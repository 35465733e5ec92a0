"""One ``DefaultAzureCredential`` per process: every storage client built with identity
settings, and the Azure OpenAI token provider, share it; the app closes it once.

Building a client does not call Azure: nothing here touches the network.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.backends.clients import ModelClients
from worker.config.settings import Settings
from worker.connections.clients import CREDENTIAL, SharedCredential, queue_service, table_service

IDENTITY = {"AzureWebJobsStorage__accountName": "contosoworker"}


def credential_of(provider: Any) -> Any:
    """The credential behind a bearer-token provider (held by its policy)."""
    for cell in provider.__closure__ or ():
        credential = getattr(cell.cell_contents, "_credential", None)
        if credential is not None:
            return credential
    raise AssertionError("the provider holds no credential")


def test_storage_clients_and_the_token_provider_share_one_credential() -> None:
    """Two queue clients, two table clients and the Azure OpenAI client without a key, all
    built with identity settings, hold the same credential object."""
    settings = Settings.from_env({**IDENTITY, "AZURE_OPENAI_ENDPOINT": "https://contoso.ai"})
    connection = settings.default_storage

    async def build() -> tuple[list[Any], Any, Any]:
        CREDENTIAL.retain()
        clients = ModelClients(settings)
        services: list[Any] = [
            queue_service(connection),
            queue_service(connection),
            table_service(connection),
            table_service(connection),
        ]
        try:
            clients.client()
            clients.client()  # the provider is built once, not per call
            provider = clients._token_provider()
            return [s.credential for s in services], credential_of(provider), CREDENTIAL.get()
        finally:
            for service in services:
                await service.close()
            await clients.close()
            await CREDENTIAL.release()

    credentials, provided, shared = asyncio.run(build())
    assert type(shared).__name__ == "DefaultAzureCredential"
    assert all(credential is shared for credential in credentials)
    assert provided is shared


def test_the_last_release_closes_it_and_a_later_use_builds_a_new_one() -> None:
    """Held by two apps: the first release keeps it; the last closes it."""
    shared = SharedCredential()

    async def scenario() -> tuple[Any, Any, Any]:
        shared.retain()
        shared.retain()
        first = shared.get()
        await shared.release()
        kept = shared.get()
        await shared.release()
        return first, kept, shared.get()

    first, kept, after = asyncio.run(scenario())
    assert kept is first
    assert after is not first


def test_a_credential_is_not_shared_across_event_loops() -> None:
    """A second ``asyncio.run`` in the process gets its own credential (a credential's
    sessions belong to the loop they were opened on)."""
    shared = SharedCredential()

    async def get() -> Any:
        return shared.get()

    assert asyncio.run(get()) is not asyncio.run(get())
