"""Texts built from request content are bounded, whatever a producer sends (SPEC §6).

A reason quotes what was wrong with a request: a name, a field, a list of unknown tools. A
producer decides how long those are, so every quote goes through ``quoted`` or ``listing``,
and every whole reason through ``cap``: a reason is read by a person, fits a dead letter and a
log line, and costs the same to build for a 60 KB body as for a small one.
"""

from collections.abc import Iterable

# Characters of a reason (a dead letter's, a log line's): room for a few quoted names.
MAX_REASON_CHARS = 2000
# Characters of one quoted piece of request content (a name, a type, a field path).
MAX_QUOTE_CHARS = 120
# Names a list shows before "and N more".
SHOWN_NAMES = 5


def cap(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text``, or its beginning and how much was left out when it has more than
    ``limit`` characters (the result has at most ``limit`` characters)."""
    if len(text) <= limit:
        return text
    note = f"… [{len(text)} characters, cut]"
    return text[: max(limit - len(note), 0)] + note[:limit]


def quoted(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr`` of a piece of request content, cut first (``repr`` of a long string is as
    long; control characters come out escaped). Not a string: its JSON kind only."""
    if isinstance(value, str):
        # Cut before repr (a 60 KB string's repr is as long) and after (repr writes
        # characters it cannot print as escapes of up to 10 characters each).
        return cap(repr(cap(value, limit)), limit + 2)
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, int | float):
        return cap(repr(value), limit)
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return f"a {type(value).__name__}"


def listing(names: Iterable[str], shown: int = SHOWN_NAMES) -> str:
    """The first ``shown`` distinct names, quoted, then "and N more" (N counts the other
    distinct names): ``'a', 'b' and 11998 more``."""
    distinct = list(dict.fromkeys(names))
    head = ", ".join(quoted(name) for name in distinct[:shown])
    rest = len(distinct) - shown
    return f"{head} and {rest} more" if rest > 0 else head
