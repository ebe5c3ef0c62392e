"""cherrychat's input rules: what a nickname, a room name and a message may be.

Pure functions, no I/O: each returns the cleaned value or raises InvalidInput with a
message the page shows as is (HTTP 400). Nicknames may contain any printable character,
``<`` included (the page renders every user string as text), but no control, format or
line-separator characters, which could spoof other users' names or break the layout.
Nicknames are case-insensitive: ``identity`` is the user a nickname names.
"""

from __future__ import annotations

import re
import unicodedata

NICK_MAX = 32
ROOM_MAX = 24
MESSAGE_MAX = 1000  # characters; the node's 64 KiB payload limit is far above this
ROOM_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
TAB_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")  # a page's own random id (crypto.randomUUID)
# Unicode categories refused in nicknames and messages: controls, format characters
# (zero-width, bidi overrides), line/paragraph separators, unassigned and private use.
_FORBIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cn", "Co", "Cs"}


class InvalidInput(ValueError):
    """Input the web app refuses; ``str(e)`` is safe to show to the user."""


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return unicodedata.normalize("NFC", value).strip()


def nickname(value: object) -> str:
    nick = _text(value, "nickname")
    if not nick:
        raise InvalidInput("choose a nickname")
    if len(nick) > NICK_MAX:
        raise InvalidInput(f"a nickname has at most {NICK_MAX} characters")
    bad = [c for c in nick if unicodedata.category(c) in _FORBIDDEN]
    if bad or any(unicodedata.category(c) == "Zs" and c != " " for c in nick):
        raise InvalidInput("a nickname may not contain control or invisible characters")
    if "  " in nick:
        raise InvalidInput("a nickname may not contain runs of spaces")
    return nick


def identity(nick: str) -> str:
    """Who a nickname names: "Alice", "alice" and "ALICE" are one user (Unicode case
    folding, so "Straße" is "strasse"); the page shows the nickname as typed."""
    return unicodedata.normalize("NFC", nick.casefold())


def room(value: object) -> str:
    name = _text(value, "room name").lower()
    if not 1 <= len(name) <= ROOM_MAX or not ROOM_RE.fullmatch(name):
        raise InvalidInput(
            f"a room name is 1 to {ROOM_MAX} letters a-z, digits 0-9 and '-', starting with a"
            " letter or digit (capitals become lower case)"
        )
    return name


def message(value: object) -> str:
    text = _text(value, "message")
    if not text:
        raise InvalidInput("the message is empty")
    if len(text) > MESSAGE_MAX:
        raise InvalidInput(f"a message has at most {MESSAGE_MAX} characters ({len(text)} given)")
    # Newlines, tabs and the zero-width joiner (emoji sequences) are fine in a message;
    # other controls and bidi overrides are not.
    if any(unicodedata.category(c) in _FORBIDDEN and c not in "\n\t\u200d" for c in text):
        raise InvalidInput("the message contains control or invisible characters")
    return text


def is_tab_id(value: object) -> bool:
    return isinstance(value, str) and TAB_RE.fullmatch(value) is not None


def tab_id(value: object, what: str = "tab id") -> str:
    """A tab's (or page load's) id, chosen by the page: part of its connection key."""
    if not is_tab_id(value):
        raise InvalidInput(f"a {what} is 8 to 64 of A-Z, a-z, 0-9, '_' and '-'")
    return value  # type: ignore[return-value]
