"""Shared pieces of the fake OpenAI server: OpenAI-shaped errors, ids, body accessors, records.

Nothing here talks to the network; the API modules and `fake_openai.FakeOpenAI` build on it.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "ApiError",
    "RecordedRequest",
    "dumps_compact",
    "estimate_tokens",
    "new_id",
    "not_found",
    "opt_bool",
    "opt_dict",
    "opt_list",
    "opt_num",
    "opt_str",
    "req_str",
    "wall_now",
]

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, sep: str = "_", length: int = 24) -> str:
    """An id shaped like OpenAI's (`resp_...`, `call_...`, `chatcmpl-...`), random and unique."""
    return prefix + sep + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def wall_now() -> int:
    """Unix seconds, the unit of every `created_at` in the OpenAI API."""
    return int(time.time())


def estimate_tokens(text: str) -> int:
    """The fake's token count: a quarter of the characters, at least 1 (a realistic order)."""
    return max(1, len(text) // 4)


class ApiError(Exception):
    """An error answered as OpenAI's JSON: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body the real API sends with this status."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        """The aiohttp response for this error."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def not_found(what: str, ident: str) -> ApiError:
    """404 for an unknown id, worded like the real API (`No thread found with id 'x'.`)."""
    return ApiError(404, f"No {what} found with id '{ident}'.", code=None)


def _bad_type(key: str, expected: str) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{key}': expected {expected}.",
        param=key,
        code="invalid_type",
    )


def req_str(body: Mapping[str, Any], key: str) -> str:
    """A required non-empty string field, else 400 `Missing required parameter`."""
    value = body.get(key)
    if value is None:
        raise ApiError(
            400,
            f"Missing required parameter: '{key}'.",
            param=key,
            code="missing_required_parameter",
        )
    if not isinstance(value, str) or not value:
        raise _bad_type(key, "a non-empty string")
    return value


def opt_str(body: Mapping[str, Any], key: str) -> str | None:
    """An optional string field (null allowed), else 400."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad_type(key, "a string")
    return value


def opt_bool(body: Mapping[str, Any], key: str) -> bool | None:
    """An optional boolean field (null allowed), else 400."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad_type(key, "a boolean")
    return value


def opt_num(body: Mapping[str, Any], key: str) -> float | None:
    """An optional number field (null allowed), else 400."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_type(key, "a number")
    return float(value)


def opt_list(body: Mapping[str, Any], key: str) -> list[Any] | None:
    """An optional array field (null allowed), else 400."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad_type(key, "an array")
    return value


def opt_dict(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """An optional object field (null allowed), else 400."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad_type(key, "an object")
    return value


@dataclass
class RecordedRequest:
    """One request the fake received (admin calls excluded).

    `had_auth` says whether an `Authorization: Bearer ...` or `api-key` header was present; the
    value itself is never kept. `api`/`endpoint`/`model` are set for model-calling endpoints
    (see `fake_openai_faults.ENDPOINTS`); `fault` names the fault that answered, if any.
    """

    method: str
    path: str
    json: Any = None
    # The query string (`stream=true&starting_after=7` of a resumed stream).
    query: str = ""
    model: str | None = None
    had_auth: bool = False
    api: str | None = None
    endpoint: str | None = None
    fault: str | None = None
    status: int | None = None
    at: float = field(default_factory=time.time)
    # Wall-clock times the first and the last chunk of text or arguments of a streamed answer
    # were sent.
    first_token_at: float | None = None
    last_token_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for `GET /admin/requests`)."""
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "json": self.json,
            "model": self.model,
            "had_auth": self.had_auth,
            "api": self.api,
            "endpoint": self.endpoint,
            "fault": self.fault,
            "status": self.status,
            "at": self.at,
            "first_token_at": self.first_token_at,
            "last_token_at": self.last_token_at,
        }


def dumps_compact(value: Any) -> str:
    """JSON without spaces, the way the real API writes tool-call `arguments`."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
