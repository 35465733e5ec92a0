"""Claims: at most one worker does a piece of a run's work that must not be done twice.

Two copies of one step can run at once (a lease lost during a long tool call, a duplicated
step message). Before a tool call runs, or a background response is created, the step claims
it in the chat's partition by *creating* a row: the table service lets only one create win.
The winner does the work and stores its result in the same row; a loser finds the result (and
uses it) or a live claim (and retries later). A claim whose worker died is taken over only
once it has expired, guarded by the row's ETag so that only one taker wins. A claim lives a few
seconds and its holder renews it while the work runs (``held``): a worker that died loses it
soon, one that is busy keeps it however long the work takes.

Rows: the tool-result row of a call (``tool-…``) and ``claim-<runId>-<step>`` for a model
call. A row without ``State`` is a result written before claims existed.

A claim written ahead for a call that a person approved is *reserved* (``State: reserved``):
its holder marks it claimed (``start``) right before the call runs. A worker that dies between
the two leaves a reservation, which the next copy of the step takes over and runs: the call
never started, and an approved call must run once (not be answered "interrupted").
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from worker.store.errors import storage_errors
from worker.store.layout import CLAIM_PREFIX, join_text, split_text, utc

CLAIMED = "claimed"
# Claimed ahead for an approved call that has not started yet (see ``Claims.start``).
RESERVED = "reserved"
# The states of a row whose work is not done (the others hold its result).
LIVE = frozenset({CLAIMED, RESERVED})
_TAKEOVER_ATTEMPTS = 3
# Seconds a claim lives unless renewed, and how often its holder renews it.
CLAIM_TTL = 15.0
RENEW_EVERY = CLAIM_TTL / 3
# Seconds between looks at a claim held elsewhere, while waiting for its result.
WAIT_POLL = 1.0


@dataclass(frozen=True)
class Claimed:
    """This worker holds the claim: do the work, then ``finish`` it. ``taken_over``: the
    claim was another worker's, which died holding it (its work may have been done);
    ``left``: what that worker had saved in the row while it worked (``HeldClaim.save``)."""

    etag: str | None
    taken_over: bool = False
    left: dict[str, Any] | None = None


@dataclass(frozen=True)
class Done:
    """The work was done already: ``value`` is its stored result."""

    value: str


@dataclass(frozen=True)
class Busy:
    """Another worker holds a live claim until ``until``."""

    until: datetime


@dataclass(frozen=True)
class Superseded:
    """The claim row went while we waited: the step holding it was stored meanwhile."""


ClaimResult = Claimed | Done | Busy | Superseded


@dataclass(frozen=True)
class NewClaim:
    """A claim written in the transaction that creates the work (see ``ChatStore.commit``):
    the worker that stores a turn's tool calls claims them at once, for the step it takes
    next in-process, which then needs no request to claim them."""

    row_key: str
    owner: str
    extra: dict[str, Any]
    # Reserved, not claimed: the holder calls ``start`` before the work begins.
    reserved: bool = False

    def entity(self, chat_id: str) -> dict[str, Any]:
        state = RESERVED if self.reserved else CLAIMED
        return claim_entity(chat_id, self.row_key, self.owner, self.extra, state=state)


def claim_entity(
    chat_id: str,
    row_key: str,
    owner: str,
    extra: dict[str, Any] | None = None,
    *,
    state: str = CLAIMED,
) -> dict[str, Any]:
    """A live claim row: held by ``owner`` for ``CLAIM_TTL`` seconds from now."""
    entity = {"PartitionKey": chat_id, "RowKey": row_key, "State": state, "Owner": owner}
    entity.update(extra or {})
    return _expiring(entity)


def model_claim_row_key(run_id: str, step: int) -> str:
    """The claim of the model call that one step of a run makes."""
    return f"{CLAIM_PREFIX}{run_id}-{step:06d}"


class Claims:
    """Claim rows of one table."""

    def __init__(self, client: TableClient, where: str, setting: str) -> None:
        self._client = client
        self._where = where
        self._setting = setting

    async def acquire(
        self,
        chat_id: str,
        row_key: str,
        *,
        owner: str,
        value_property: str,
        patience: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> ClaimResult:
        """Claim ``row_key``, or say who holds it or what it produced.

        While another worker holds the claim, wait up to ``patience`` seconds for its result
        (or for its claim to expire, when it died): a copy of a step that waits here costs no
        attempt of its message. A claim row that disappears while we wait was removed by the
        commit of the step that holds it: the work is stored, and this copy is ``Superseded``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        entity = claim_entity(chat_id, row_key, owner, extra)
        async with storage_errors("claim a call", self._where, self._setting):
            try:
                created = await self._client.create_entity(entity)
                return Claimed(_etag(created))
            except ResourceExistsError:
                pass
            while True:
                claim = await self._inspect(chat_id, row_key, entity, value_property)
                left = deadline - loop.time()
                if not isinstance(claim, Busy) or left <= 0:
                    return claim
                until = (claim.until - datetime.now(UTC)).total_seconds()
                await asyncio.sleep(min(max(until, 0.2), WAIT_POLL, left))

    async def _inspect(
        self, chat_id: str, row_key: str, entity: dict[str, Any], value_property: str
    ) -> ClaimResult:
        """What an existing claim row says; an expired claim is taken over (one taker wins)."""
        for _ in range(_TAKEOVER_ATTEMPTS):
            try:
                current = await self._client.get_entity(chat_id, row_key)
            except ResourceNotFoundError:
                return Superseded()
            state = current.get("State")
            if state not in LIVE:
                return Done(join_text(dict(current), value_property))
            now = datetime.now(UTC)
            expires = utc(current.get("ExpiresAt")) or now
            if expires > now:
                return Busy(expires)
            try:
                # The holder died: take over, unless another worker just did. A reservation
                # never started its work: taken over, the work is simply done now.
                taken = await self._client.update_entity(
                    _expiring(entity),
                    mode=UpdateMode.REPLACE,
                    etag=current.metadata.get("etag"),
                    match_condition=MatchConditions.IfNotModified,
                )
                return Claimed(_etag(taken), taken_over=state == CLAIMED, left=dict(current))
            except ResourceModifiedError:
                continue
        return Busy(datetime.now(UTC) + timedelta(seconds=1))

    async def start(self, chat_id: str, row_key: str, reserved: Claimed) -> Claimed | None:
        """Mark a reservation claimed, right before its work begins (guarded by the ETag the
        reservation was written with): from now on a worker that finds the row after this one
        died answers the call "interrupted" instead of running it again. None when the row
        changed meanwhile (its step was stored, or another copy took the reservation over):
        this copy must not do the work."""
        expires = datetime.now(UTC) + timedelta(seconds=CLAIM_TTL)
        patch = {"PartitionKey": chat_id, "RowKey": row_key, "State": CLAIMED, "ExpiresAt": expires}
        try:
            async with storage_errors("start a claimed call", self._where, self._setting):
                result = await self._client.update_entity(
                    patch,
                    mode=UpdateMode.MERGE,
                    etag=reserved.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
        except (ResourceModifiedError, ResourceNotFoundError):
            return None
        return Claimed(_etag(result) or reserved.etag)

    @contextlib.asynccontextmanager
    async def held(self, chat_id: str, row_key: str, claim: Claimed) -> AsyncIterator["HeldClaim"]:
        """Renew the claim every few seconds while the body runs; the body may save what it
        has done so far in the row (``HeldClaim.save``), which renews it too."""
        holder = HeldClaim(self._client, chat_id, row_key, claim.etag, self._where, self._setting)
        renewal = asyncio.create_task(holder.renew_forever())
        try:
            yield holder
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    async def release(self, chat_id: str, row_key: str, claim: Claimed) -> None:
        """Give a claim back unused (its step turned out to be stale): delete its row."""
        with contextlib.suppress(ResourceNotFoundError, ResourceModifiedError):
            async with storage_errors("release a claim", self._where, self._setting):
                await self._client.delete_entity(
                    chat_id,
                    row_key,
                    etag=claim.etag,
                    match_condition=MatchConditions.IfNotModified,
                )

    async def finish(
        self, chat_id: str, row_key: str, *, value_property: str, value: str, extra: dict[str, Any]
    ) -> None:
        """Store the claimed work's result in its row (it is then ``Done`` for everyone)."""
        entity = {
            "PartitionKey": chat_id,
            "RowKey": row_key,
            "State": "done",
            **extra,
            **split_text(value_property, value),
        }
        async with storage_errors("store a claimed result", self._where, self._setting):
            await self._client.upsert_entity(entity, mode=UpdateMode.REPLACE)


class ClaimLost(Exception):
    """The claim is not ours any more (taken over after a stall, or its step was stored)."""


class HeldClaim:
    """A claim this worker holds: renewed every few seconds, and where the work records how
    far it got (a streamed call's checkpoints), each write under the row's ETag, so that a
    worker that took the claim over is never overwritten."""

    def __init__(
        self, client: TableClient, chat_id: str, row_key: str, etag: str | None,
        where: str, setting: str,
    ) -> None:  # fmt: skip
        self._client = client
        self._chat_id = chat_id
        self._row_key = row_key
        self._etag = etag
        self._where = where
        self._setting = setting
        self._lock = asyncio.Lock()
        self._written = asyncio.get_running_loop().time()
        self.saves = 0

    async def save(self, properties: dict[str, Any]) -> None:
        """Merge ``properties`` into the claim row (and renew it); raises ``ClaimLost`` when
        the claim is not ours any more."""
        async with self._lock:
            try:
                async with storage_errors("save a claim's progress", self._where, self._setting):
                    await self._write(properties)
            except (ResourceModifiedError, ResourceNotFoundError):
                raise ClaimLost(self._row_key) from None
            self.saves += 1

    async def renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(self._written + RENEW_EVERY - loop.time(), 0.0))
            if loop.time() - self._written < RENEW_EVERY:
                continue  # a save renewed it meanwhile
            async with self._lock:
                try:
                    await self._write({})
                except (ResourceModifiedError, ResourceNotFoundError):
                    return  # taken over after a stall, or the step was stored: nothing to keep
                except Exception:
                    # Storage hiccup: try again at the next beat; the TTL covers a few.
                    self._written = loop.time()

    async def _write(self, properties: dict[str, Any]) -> None:
        expires = datetime.now(UTC) + timedelta(seconds=CLAIM_TTL)
        patch = {"PartitionKey": self._chat_id, "RowKey": self._row_key, "ExpiresAt": expires}
        result = await self._client.update_entity(
            {**patch, **properties},
            mode=UpdateMode.MERGE,
            etag=self._etag,
            match_condition=MatchConditions.IfNotModified,
        )
        self._etag = _etag(result) or self._etag
        self._written = asyncio.get_running_loop().time()


def _expiring(entity: dict[str, Any]) -> dict[str, Any]:
    return {**entity, "ExpiresAt": datetime.now(UTC) + timedelta(seconds=CLAIM_TTL)}


def _etag(response: Any) -> str | None:
    if isinstance(response, dict):
        value = response.get("etag")
        return str(value) if value else None
    return None
