"""Which requests the query's keys open (``worker.http.keys``; pure): the headers a key may
come in, and the comparison with every key. Through HTTP: tests/test_http_query.py."""

import pytest
from multidict import CIMultiDict

from worker.http.keys import QueryKeys, presented_keys

KEY = "first-key-0123456789"
OTHER = "second-key-0123456789"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, []),
        ({"Authorization": f"Bearer {KEY}"}, [KEY]),
        ({"authorization": f"BEARER   {KEY}  "}, [KEY]),
        ({"Authorization": f"Basic {KEY}"}, []),
        ({"Authorization": "Bearer"}, []),
        ({"Authorization": KEY}, []),
        ({"X-Functions-Key": f" {KEY} "}, [KEY]),
        ({"Authorization": f"Bearer {KEY}", "x-functions-key": OTHER}, [KEY, OTHER]),
    ],
)
def test_keys_come_as_a_bearer_token_or_the_functions_header(
    headers: dict[str, str], expected: list[str]
) -> None:
    assert presented_keys(CIMultiDict(headers)) == expected


def test_any_presented_value_may_match_any_key() -> None:
    keys = QueryKeys([KEY, OTHER])
    assert keys and "0123" not in repr(keys)
    assert keys.accepts([KEY]) and keys.accepts([OTHER]) and keys.accepts(["wrong", OTHER])
    for wrong in ([], [""], [KEY[:-1]], [KEY + "x"], [KEY.upper()], [f"{KEY},{OTHER}"]):
        assert not keys.accepts(wrong), wrong
    # A header's undecodable bytes (aiohttp keeps them as surrogates) are just another value.
    assert not keys.accepts(["\udcff" + KEY])
    assert not QueryKeys([]) and not QueryKeys([]).accepts([KEY])
