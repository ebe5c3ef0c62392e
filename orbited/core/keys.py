"""Connection keys: the (user, session, location) triple that names one browser connection.

A key is what the web app addresses events to and what a browser token proves. Its JSON
form is a 3-element array of strings (docs/protocol.md, "Connection keys").
"""

from __future__ import annotations

from typing import NamedTuple

MAX_PART_BYTES = 256


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
