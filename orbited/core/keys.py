"""Connection keys: the (user, session, location) triple that names one browser connection.

A key is what the web app addresses events to and what a browser token proves. Its JSON
form is a 3-element array of strings (docs/protocol.md, "Connection keys").

An event request may also address several keys of one user with a wildcard, the exact
string ``"*"`` (WILDCARD): ``[user, "*", "*"]`` is every key of the user, ``[user,
session, "*"]`` every key of one session (a Selector). ``"*"`` is therefore reserved as
a whole part: tokens refuse it (orbited.core.tokens).
"""

from __future__ import annotations

from typing import NamedTuple

MAX_PART_BYTES = 256
WILDCARD = "*"


class KeyError_(ValueError):
    """A connection key that is not three strings of bounded size."""


class ConnectionKey(NamedTuple):
    user: str
    session: str
    location: str

    @classmethod
    def from_json(cls, value: object) -> ConnectionKey:
        # Fast path (every recipient of every event): three short strings, user not empty.
        # 64 characters are at most 256 bytes of UTF-8, so no encoding is needed to check.
        if type(value) is list and len(value) == 3:
            user, session, location = value
            if (
                type(user) is str and type(session) is str and type(location) is str
                and 0 < len(user) <= 64 and len(session) <= 64 and len(location) <= 64
            ):  # fmt: skip
                return tuple.__new__(cls, (user, session, location))
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise KeyError_("a connection key is an array [user, session, location]")
        for name, part in zip(cls._fields, value, strict=True):
            if not isinstance(part, str):
                raise KeyError_(f"key {name} must be a string")
            if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
                raise KeyError_(f"key {name} longer than {MAX_PART_BYTES} bytes")
        if not value[0]:
            raise KeyError_("key user must not be empty")
        return cls(*value)

    def to_json(self) -> list[str]:
        return [self.user, self.session, self.location]

    def __str__(self) -> str:
        return f"({self.user}, {self.session}, {self.location})"


class Selector(NamedTuple):
    """A user's connections (``session`` None) or one session's, as an event request
    addresses them: ``[user, "*", "*"]`` or ``[user, session, "*"]``."""

    user: str
    session: str | None  # None: every session

    def matches(self, key: ConnectionKey) -> bool:
        return key[0] == self.user and (self.session is None or key[1] == self.session)

    def to_json(self) -> list[str]:
        session = self.session
        return [self.user, WILDCARD if session is None else session, WILDCARD]

    def __str__(self) -> str:
        session = self.session
        return f"({self.user}, {WILDCARD if session is None else session}, {WILDCARD})"


Recipient = ConnectionKey | Selector

WILDCARD_SESSION = 'a wildcard session needs a wildcard location: [user, "*", "*"]'
WILDCARD_USER = "key user cannot be a wildcard"


def parse_recipient(value: object) -> Recipient:
    """An event request's recipient: a ConnectionKey, or a Selector for ``[user, "*",
    "*"]`` and ``[user, session, "*"]``. KeyError_ (``bad_key``) for anything else,
    including ``"*"`` as the user and ``[user, "*", location]``."""
    # Fast path (every recipient of every event): ConnectionKey.from_json's, plus one
    # containment test for the wildcard.
    if type(value) is list and len(value) == 3 and WILDCARD not in value:
        user, session, location = value
        if (
            type(user) is str and type(session) is str and type(location) is str
            and 0 < len(user) <= 64 and len(session) <= 64 and len(location) <= 64
        ):  # fmt: skip
            return tuple.__new__(ConnectionKey, (user, session, location))
    key = ConnectionKey.from_json(value)  # every check and message of a plain key
    user, session, location = key
    if user == WILDCARD:
        raise KeyError_(WILDCARD_USER)
    if location == WILDCARD:
        return Selector(user, None if session == WILDCARD else session)
    if session == WILDCARD:
        raise KeyError_(WILDCARD_SESSION)
    return key
