"""cherrychat's state in SQLite: sessions, rooms, who is in which room, messages, presence.

Orbited has no pub/sub by design: "who gets a room's messages" is the web app's own
state, kept here so that a web-app restart keeps rooms, members and history. Messages are
numbered 1, 2, 3, … within each room, so a page sees a hole when it misses one (its node
died, a push failed) and asks for ``messages(room, after=<last id before the hole>)``.

Presence (who is online, on which node) is also here, fed by the nodes' signed webhooks.
Calls are synchronous: each is one small local transaction (well under a millisecond),
cheaper than handing it to a thread.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_ROOMS = ("lobby", "python", "twisted")
HISTORY = 50  # messages a page gets when it joins or opens a room
MAX_FETCH = 500  # messages per catch-up request; the page asks again if it got this many

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY, nick TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    room TEXT NOT NULL REFERENCES rooms(name), nick TEXT NOT NULL, joined REAL NOT NULL,
    PRIMARY KEY (room, nick));
CREATE INDEX IF NOT EXISTS members_by_nick ON members (nick);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL, id INTEGER NOT NULL, nick TEXT NOT NULL,
    kind TEXT NOT NULL, text TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY (room, id));
CREATE TABLE IF NOT EXISTS presence (
    nick TEXT PRIMARY KEY, node TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS node_serials (node TEXT PRIMARY KEY, serial INTEGER NOT NULL);
"""


class NickTaken(Exception):
    """Someone online is using this nickname."""


class Store:
    def __init__(self, path: Path | str) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)  # autocommit; explicit txns
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        for name in DEFAULT_ROOMS:
            self.db.execute("INSERT OR IGNORE INTO rooms VALUES (?, ?)", (name, time.time()))

    def close(self) -> None:
        self.db.close()

    # -- sessions ----------------------------------------------------------------------

    def login(self, nick: str) -> str:
        """A new session id (the cookie) for ``nick``. A nickname whose owner is online is
        taken; one whose owner is offline passes to the new session (with its rooms)."""
        with self._txn():
            if self.is_online(nick):
                raise NickTaken(nick)
            sid = secrets.token_urlsafe(32)
            self.db.execute("DELETE FROM sessions WHERE nick = ?", (nick,))
            self.db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (sid, nick, time.time()))
            return sid

    def session(self, sid: str | None) -> str | None:
        """The nickname of session ``sid``, or None."""
        if not sid:
            return None
        row = self.db.execute("SELECT nick FROM sessions WHERE sid = ?", (sid,)).fetchone()
        return row["nick"] if row else None

    def logout(self, sid: str) -> None:
        self.db.execute("DELETE FROM sessions WHERE sid = ?", (sid,))

    # -- rooms and members -------------------------------------------------------------

    def rooms(self, nick: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT r.name, COUNT(m.nick) AS members, SUM(m.nick = ?) AS joined "
            "FROM rooms r LEFT JOIN members m ON m.room = r.name GROUP BY r.name ORDER BY r.name",
            (nick,),
        )
        return [{"name": r["name"], "members": r["members"], "joined": bool(r["joined"])}
                for r in rows]  # fmt: skip

    def join(self, room: str, nick: str) -> bool:
        """Add ``nick`` to ``room`` (created if new); False if already a member."""
        with self._txn():
            self.db.execute("INSERT OR IGNORE INTO rooms VALUES (?, ?)", (room, time.time()))
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO members VALUES (?, ?, ?)", (room, nick, time.time())
            )
            return cursor.rowcount == 1

    def leave(self, room: str, nick: str) -> bool:
        cursor = self.db.execute("DELETE FROM members WHERE room = ? AND nick = ?", (room, nick))
        return cursor.rowcount == 1

    def is_member(self, room: str, nick: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM members WHERE room = ? AND nick = ?", (room, nick)
        ).fetchone()
        return row is not None

    def rooms_of(self, nick: str) -> list[str]:
        rows = self.db.execute("SELECT room FROM members WHERE nick = ? ORDER BY room", (nick,))
        return [r["room"] for r in rows]

    def member_nicks(self, room: str) -> list[str]:
        rows = self.db.execute("SELECT nick FROM members WHERE room = ? ORDER BY nick", (room,))
        return [r["nick"] for r in rows]

    def members(self, room: str) -> list[dict[str, Any]]:
        """The room's members, online ones first, each with its online flag."""
        rows = self.db.execute(
            "SELECT m.nick, p.nick IS NOT NULL AS online FROM members m "
            "LEFT JOIN presence p ON p.nick = m.nick WHERE m.room = ? "
            "ORDER BY online DESC, m.nick",
            (room,),
        )
        return [{"nick": r["nick"], "online": bool(r["online"])} for r in rows]

    # -- messages ----------------------------------------------------------------------

    def add_message(self, room: str, nick: str, text: str, kind: str = "text",
                    now: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Store a message (kind: text, join or leave) as the room's next id and return
        it as pushed to pages. One statement, so two writers cannot take the same id."""
        when = time.time() if now is None else now
        (number,) = self.db.execute(
            "INSERT INTO messages (room, id, nick, kind, text, time) VALUES "
            "(?, (SELECT COALESCE(MAX(id), 0) + 1 FROM messages WHERE room = ?), ?, ?, ?, ?) "
            "RETURNING id",
            (room, room, nick, kind, text, when),
        ).fetchall()[0]  # fetchall: the statement must finish, or its write lock stays
        return {"id": number, "room": room, "nick": nick, "kind": kind,
                "text": text, "time": when}  # fmt: skip

    def messages(self, room: str, after: int = 0, limit: int = MAX_FETCH) -> list[dict]:
        rows = self.db.execute(
            "SELECT * FROM messages WHERE room = ? AND id > ? ORDER BY id LIMIT ?",
            (room, after, limit),
        )
        return [dict(r) for r in rows]

    def recent(self, room: str, count: int = HISTORY) -> list[dict]:
        rows = self.db.execute(
            "SELECT * FROM (SELECT * FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?) "
            "ORDER BY id",
            (room, count),
        )
        return [dict(r) for r in rows]

    # -- presence ----------------------------------------------------------------------

    def is_online(self, nick: str) -> bool:
        row = self.db.execute("SELECT 1 FROM presence WHERE nick = ?", (nick,)).fetchone()
        return row is not None

    def online(self) -> dict[str, str]:
        return {r["nick"]: r["node"] for r in self.db.execute("SELECT nick, node FROM presence")}

    def apply_presence(self, node: str, events: Iterable[tuple[str, str, int]]) -> set[str]:
        """Apply one webhook batch from ``node``: (type, nick, serial) in serial order.
        Returns the nicknames whose online state changed.

        A serial lower than the last one seen from ``node`` means the node restarted and
        lost its mailboxes without signoffs (docs/protocol.md): everyone it had is gone.
        A signoff only counts from the node the nick last signed on to, because after a
        failover the spare's signon can arrive before the old node's signoff would have."""
        changed: set[str] = set()
        with self._txn():
            row = self.db.execute(
                "SELECT serial FROM node_serials WHERE node = ?", (node,)
            ).fetchone()
            last = row["serial"] if row else 0
            for kind, nick, serial in events:
                if serial <= last:
                    changed |= self._drop_node(node)
                last = serial
                if kind == "signon":
                    before = self.db.execute(
                        "SELECT node FROM presence WHERE nick = ?", (nick,)
                    ).fetchone()
                    self.db.execute("INSERT OR REPLACE INTO presence VALUES (?, ?, ?)",
                                    (nick, node, time.time()))  # fmt: skip
                    if before is None:
                        changed.add(nick)
                elif kind == "signoff":
                    cursor = self.db.execute(
                        "DELETE FROM presence WHERE nick = ? AND node = ?", (nick, node)
                    )
                    if cursor.rowcount:
                        changed.add(nick)
            self.db.execute("INSERT OR REPLACE INTO node_serials VALUES (?, ?)", (node, last))
        return changed

    def drop_nodes(self, nodes: Iterable[str]) -> set[str]:
        """Forget everyone on ``nodes`` (HaloD says they failed); returns those nicks."""
        changed: set[str] = set()
        with self._txn():
            for node in nodes:
                changed |= self._drop_node(node)
        return changed

    def _drop_node(self, node: str) -> set[str]:
        rows = self.db.execute("SELECT nick FROM presence WHERE node = ?", (node,)).fetchall()
        self.db.execute("DELETE FROM presence WHERE node = ?", (node,))
        self.db.execute("DELETE FROM node_serials WHERE node = ?", (node,))
        return {r["nick"] for r in rows}

    def clear_presence(self) -> None:
        """Forget who was online: the nodes were (re)started and have no one yet."""
        self.db.executescript("DELETE FROM presence; DELETE FROM node_serials;")

    # ----------------------------------------------------------------------------------

    def _txn(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error); nests as a no-op."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> None:
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        if self.outer:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
