"""What text a delta may carry (pure): the text collected since the last delta, never cut
inside a character.

Text arrives as Python strings, so a UTF-8 character is never cut; but a model may send a
character outside the BMP as a JSON-escaped surrogate pair split over two chunks, each half a
lone surrogate. Halves are joined into their character, and text that ends with a high
surrogate is not ready to flush until its partner arrives. Big texts (a remainder polled in
one piece) are cut into pieces that each fit a queue message.
"""

from schemas.decode import join_surrogates

# Characters of one delta: at most 4 UTF-8 bytes each, 32 KB of text fits one queue message
# with room for the event's other fields, Base64 included.
MAX_DELTA_CHARS = 8_000


def _is_high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


class Coalescer:
    """The text collected since the last delta."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def add(self, text: str) -> None:
        if text:
            self._parts.append(text)

    @property
    def empty(self) -> bool:
        return not self._parts

    def ready(self) -> bool:
        """Whether there is text to flush that does not end inside a surrogate pair."""
        return bool(self._parts) and not _is_high_surrogate(self._parts[-1][-1])

    def take(self) -> str:
        """All the text collected, its surrogate pairs joined; the collector is emptied."""
        text = join_surrogates("".join(self._parts))
        self._parts.clear()
        return text


def pieces(text: str, limit: int = MAX_DELTA_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters (one piece for short text, even
    empty), never cut inside a surrogate pair."""
    if len(text) <= limit:
        return [text]
    cut: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + limit, len(text))
        if end < len(text) and _is_high_surrogate(text[end - 1]) and end - 1 > start:
            end -= 1  # a lone half (the model sent no partner) stays with what follows
        cut.append(text[start:end])
        start = end
    return cut
