"""Small text helpers every message uses, so that lists, quotes and one-line errors read the same everywhere."""

from __future__ import annotations

from typing import Iterable

MAX_LISTED = 5
"""How many names a message lists before saying how many more there are."""

MAX_QUOTED = 200
"""How many characters of a user's text (a label, a key, a path) a message quotes."""


def listed(names: Iterable[object], limit: int = MAX_LISTED, *, quote: bool = True, sep: str = ", ") -> str:
    """``'a', 'b', 'c' and 4 more``: the first ``limit`` names (quoted with repr unless ``quote=False``, each
    capped at :data:`MAX_QUOTED` characters) and how many more there are."""
    names = list(names)
    shown = [clipped(repr(name) if quote else str(name)) for name in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return sep.join(shown) + more


def clipped(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis and the full length when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def one_line(text: str) -> str:
    """``text`` with carriage returns and newlines escaped, so a message stays one line on stderr."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def first_sentence(text: object, limit: int = MAX_QUOTED) -> str:
    """The first line and sentence of a library's message (they often run to a paragraph), clipped."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    cut = line.find(". ")
    return clipped(line[: cut + 1] if cut > 0 else line, limit)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' run to paragraphs), or its type's name."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
