"""cherrychat's state in SQLite: sessions, rooms, who is in which room, messages, presence.

Orbited has no pub/sub by design: "who gets a room's messages" is the web app's own
state, kept here so that a web-app restart keeps rooms, members and history. Messages are
numbered 1, 2, 3, … within each room, so a page sees a hole when it misses one (its node
died, a push failed) and asks for ``messages(room, after=<last id before the hole>)``.

Tabs and presence: every tab of a logged-in user has its own connection key
``(nick, session tag, "/cherrychat/<tab>")`` (a second tab must not replace the first), so
the app's pushes, addressed to users, reach every tab a node has for them. A tab is
registered by its page
(``open_tab``), on a node once that node's signed webhook says ``signon``, and gone at the
``signoff`` (the node's linger after its connection closed), at the page's goodbye
(``close_tab``, sent on ``pagehide``) or at logout. A user is **online** while any of
their tabs is open and on a node; only an online user's nickname is taken.
Calls are synchronous: each is one small local transaction (well under a millisecond),
cheaper than handing it to a thread.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cherrychat.rules import identity

DEFAULT_ROOMS = ("lobby", "python", "twisted")
HISTORY = 50  # messages a page gets when it joins or opens a room
MAX_FETCH = 500  # messages per catch-up request; the page asks again if it got this many
TAB_WAIT = 120.0  # seconds a tab not on any node is kept (it may be connecting or failing over)
SCHEMA_VERSION = 2

# A user is their nickname's identity (rules.identity: case-folded, so "Alice" and "alice"
# are one user); ``users.nick`` is how they typed it at their latest login, as shown.
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (ident TEXT PRIMARY KEY, nick TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY, ident TEXT NOT NULL UNIQUE, tag TEXT NOT NULL UNIQUE,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    room TEXT NOT NULL REFERENCES rooms(name), ident TEXT NOT NULL, joined REAL NOT NULL,
    PRIMARY KEY (room, ident));
CREATE INDEX IF NOT EXISTS members_by_ident ON members (ident);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL, id INTEGER NOT NULL, nick TEXT NOT NULL,
    kind TEXT NOT NULL, text TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY (room, id));
CREATE TABLE IF NOT EXISTS tabs (
    tag TEXT NOT NULL, tab TEXT NOT NULL, ident TEXT NOT NULL, page TEXT NOT NULL,
    node TEXT, closed INTEGER NOT NULL DEFAULT 0, seen REAL NOT NULL, PRIMARY KEY (tag, tab));
CREATE INDEX IF NOT EXISTS tabs_by_ident ON tabs (ident);
CREATE TABLE IF NOT EXISTS node_serials (node TEXT PRIMARY KEY, serial INTEGER NOT NULL);
"""
# Before version 1 presence was one row per nickname and sessions had no tag: both are
# short-lived (a login, who is connected now), so they are dropped and users log in again.
MIGRATE_TO_1 = """
DROP TABLE IF EXISTS presence; DROP TABLE IF EXISTS sessions; DROP TABLE IF EXISTS node_serials;
"""
# Version 2 names users by identity: members are re-keyed (two spellings of one nickname
# in a room become one member), short-lived sessions and tabs start afresh.
MIGRATE_TO_2 = """
DROP TABLE IF EXISTS sessions; DROP TABLE IF EXISTS tabs;
CREATE TABLE IF NOT EXISTS users (ident TEXT PRIMARY KEY, nick TEXT NOT NULL);
INSERT OR IGNORE INTO users SELECT identity(nick), nick FROM members ORDER BY joined;
CREATE TABLE members_v2 (
    room TEXT NOT NULL REFERENCES rooms(name), ident TEXT NOT NULL, joined REAL NOT NULL,
    PRIMARY KEY (room, ident));
INSERT OR IGNORE INTO members_v2 SELECT room, identity(nick), joined FROM members ORDER BY joined;
DROP TABLE members;
ALTER TABLE members_v2 RENAME TO members;
"""
ONLINE = "node IS NOT NULL AND closed = 0"  # a tab that counts: open, and on a node


@dataclass(frozen=True)
class Session:
    nick: str  # as typed at login, for display
    ident: str  # the user: rules.identity(nick)
    tag: str  # public: the session part of the user's connection keys


@dataclass(frozen=True)
class Tab:
    """One open page: its connection key is (ident, tag, "/cherrychat/" + tab)."""

    ident: str
    tag: str
    tab: str


@dataclass(frozen=True)
class Presence:
    """One notice of a node's webhook about a key of this app."""

    kind: str  # "signon" or "signoff"
    tab: Tab
    serial: int


class NickTaken(Exception):
    """Someone online is using this nickname."""


class Store:
    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:" and not Path(path).exists():
            # It holds the session ids (the login cookies): readable by the owner only (the
            # WAL and shared-memory files take the database file's mode).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.db = sqlite3.connect(str(path), isolation_level=None)  # autocommit; explicit txns
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.create_function("identity", 1, identity, deterministic=True)
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version < 1:
            self.db.executescript(MIGRATE_TO_1)
        if version < 2 and self.db.execute("SELECT 1 FROM pragma_table_info('members') "
                                           "WHERE name = 'nick'").fetchone():  # fmt: skip
            self.db.executescript(MIGRATE_TO_2)
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        for name in DEFAULT_ROOMS:
            self.db.execute("INSERT OR IGNORE INTO rooms VALUES (?, ?)", (name, time.time()))

    def close(self) -> None:
        self.db.close()

    # -- sessions ----------------------------------------------------------------------

    def login(self, nick: str) -> str:
        """A new session id (the cookie) for ``nick``. A nickname whose owner is online is
        taken, in any spelling of its case; one whose owner is offline passes to the new
        session (with its rooms, shown as typed now), and the old session ends."""
        ident = identity(nick)
        with self._txn():
            if self.is_online(ident):
                raise NickTaken(nick)
            sid, tag = secrets.token_urlsafe(32), secrets.token_urlsafe(9)
            self.db.execute("DELETE FROM tabs WHERE ident = ?", (ident,))
            self.db.execute("DELETE FROM sessions WHERE ident = ?", (ident,))
            self.db.execute("INSERT OR REPLACE INTO users VALUES (?, ?)", (ident, nick))
            self.db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                            (sid, ident, tag, time.time()))  # fmt: skip
            return sid

    def nick_of(self, ident: str) -> str | None:
        """How user ``ident`` typed their nickname at their latest login, or None."""
        row = self.db.execute("SELECT nick FROM users WHERE ident = ?", (ident,)).fetchone()
        return row["nick"] if row else None

    def session(self, sid: str | None) -> Session | None:
        """The session whose cookie is ``sid``, or None."""
        if not sid:
            return None
        row = self.db.execute(
            "SELECT u.nick, s.ident, s.tag FROM sessions s JOIN users u ON u.ident = s.ident "
            "WHERE s.sid = ?",
            (sid,),
        ).fetchone()
        return Session(row["nick"], row["ident"], row["tag"]) if row else None

    def logout(self, sid: str) -> list[Tab]:
        """End session ``sid`` at once: its user is offline and the nickname free (the
        nodes' signoffs for its keys, a linger later, are ignored). Returns the tabs it had,
        so they can be told."""
        with self._txn():
            session = self.session(sid)
            if session is None:
                return []
            tabs = self._tabs("tag = ?", (session.tag,))
            self.db.execute("DELETE FROM tabs WHERE tag = ?", (session.tag,))
            self.db.execute("DELETE FROM sessions WHERE sid = ?", (sid,))
            return tabs

    # -- tabs --------------------------------------------------------------------------

    def open_tab(self, session: Session, tab: str, page: str, now: float | None = None) -> bool:
        """The page ``page`` (one load of tab ``tab``) opened: it gets pushes from now on.
        Reopening (a reload) keeps what the node said. True if its user came online."""
        now = time.time() if now is None else now
        with self._txn():
            was = self.is_online(session.ident)
            self.db.execute("DELETE FROM tabs WHERE node IS NULL AND seen < ?", (now - TAB_WAIT,))
            self.db.execute(
                "INSERT INTO tabs (tag, tab, ident, page, node, closed, seen) "
                "VALUES (?, ?, ?, ?, NULL, 0, ?) ON CONFLICT (tag, tab) DO UPDATE SET "
                "page = excluded.page, closed = 0, seen = excluded.seen",
                (session.tag, tab, session.ident, page, now),
            )
            return not was and self.is_online(session.ident)

    def close_tab(self, session: Session, tab: str, page: str) -> bool:
        """Page ``page`` of tab ``tab`` said goodbye (closed, reloading, navigating away);
        a goodbye from an earlier load of the tab than the current one is ignored. True if
        its user went offline."""
        with self._txn():
            was = self.is_online(session.ident)
            self.db.execute("UPDATE tabs SET closed = 1 WHERE tag = ? AND tab = ? AND page = ?",
                            (session.tag, tab, page))  # fmt: skip
            return was and not self.is_online(session.ident)

    def tabs_of(self, idents: Iterable[str]) -> list[Tab]:
        """Every open tab of these users: where their pushes go."""
        wanted = list(idents)
        marks = ",".join("?" * len(wanted))
        return self._tabs(f"closed = 0 AND ident IN ({marks})", wanted) if wanted else []

    def _tabs(self, where: str, args: Iterable[object]) -> list[Tab]:
        rows = self.db.execute(
            f"SELECT ident, tag, tab FROM tabs WHERE {where} ORDER BY ident, tag, tab", tuple(args)
        )
        return [Tab(r["ident"], r["tag"], r["tab"]) for r in rows]

    # -- rooms and members -------------------------------------------------------------

    def rooms(self, ident: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT r.name, COUNT(m.ident) AS members, SUM(m.ident = ?) AS joined "
            "FROM rooms r LEFT JOIN members m ON m.room = r.name GROUP BY r.name ORDER BY r.name",
            (ident,),
        )
        return [{"name": r["name"], "members": r["members"], "joined": bool(r["joined"])}
                for r in rows]  # fmt: skip

    def join(self, room: str, ident: str) -> bool:
        """Add user ``ident`` to ``room`` (created if new); False if already a member."""
        with self._txn():
            self.db.execute("INSERT OR IGNORE INTO rooms VALUES (?, ?)", (room, time.time()))
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO members VALUES (?, ?, ?)", (room, ident, time.time())
            )
            return cursor.rowcount == 1

    def leave(self, room: str, ident: str) -> bool:
        cursor = self.db.execute("DELETE FROM members WHERE room = ? AND ident = ?", (room, ident))
        return cursor.rowcount == 1

    def is_member(self, room: str, ident: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM members WHERE room = ? AND ident = ?", (room, ident)
        ).fetchone()
        return row is not None

    def rooms_of(self, ident: str) -> list[str]:
        rows = self.db.execute("SELECT room FROM members WHERE ident = ? ORDER BY room", (ident,))
        return [r["room"] for r in rows]

    def member_idents(self, room: str) -> list[str]:
        rows = self.db.execute("SELECT ident FROM members WHERE room = ? ORDER BY ident", (room,))
        return [r["ident"] for r in rows]

    def members(self, room: str) -> list[dict[str, Any]]:
        """The room's members as shown (each user's latest spelling), online ones first."""
        rows = self.db.execute(
            "SELECT COALESCE(u.nick, m.ident) AS nick, EXISTS (SELECT 1 FROM tabs t WHERE "
            f"t.ident = m.ident AND {ONLINE}) AS online FROM members m "
            "LEFT JOIN users u ON u.ident = m.ident WHERE m.room = ? ORDER BY online DESC, m.ident",
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

    def is_online(self, ident: str) -> bool:
        row = self.db.execute(f"SELECT 1 FROM tabs WHERE ident = ? AND {ONLINE}", (ident,))
        return row.fetchone() is not None

    def online(self) -> dict[str, int]:
        """Users (identities) online, each with the number of their tabs that count."""
        rows = self.db.execute(
            f"SELECT ident, COUNT(*) AS n FROM tabs WHERE {ONLINE} GROUP BY ident"
        )
        return {r["ident"]: r["n"] for r in rows}

    def nodes(self) -> set[str]:
        """The nodes that have tabs on them."""
        rows = self.db.execute("SELECT DISTINCT node FROM tabs WHERE node IS NOT NULL")
        return {r["node"] for r in rows}

    def apply_presence(self, node: str, events: Iterable[Presence]) -> set[str]:
        """Apply one webhook batch from ``node``, in serial order. Returns the users
        (identities) whose online state changed.

        A serial lower than the last one seen from ``node`` means the node restarted and
        lost its mailboxes without signoffs (docs/protocol.md): every tab it had is off it.
        A signoff only counts from the node the tab last signed on to, because after a
        failover the spare's signon can arrive before the old node's signoff would have.
        A signon counts only for a live session of that user (not after its logout)."""
        with self._txn():
            before = self.online()
            row = self.db.execute(
                "SELECT serial FROM node_serials WHERE node = ?", (node,)
            ).fetchone()
            last = row["serial"] if row else 0
            for event in events:
                if event.serial <= last:
                    self._drop_node(node)
                last = event.serial
                tab = event.tab
                if event.kind == "signon":
                    live = self.db.execute("SELECT 1 FROM sessions WHERE tag = ? AND ident = ?",
                                           (tab.tag, tab.ident)).fetchone()  # fmt: skip
                    if live:  # a new connection: the tab is open (again), on this node
                        self.db.execute(
                            "INSERT INTO tabs (tag, tab, ident, page, node, closed, seen) "
                            "VALUES (?, ?, ?, '', ?, 0, ?) ON CONFLICT (tag, tab) DO UPDATE "
                            "SET node = excluded.node, seen = excluded.seen",
                            (tab.tag, tab.tab, tab.ident, node, time.time()),
                        )
                elif event.kind == "signoff":
                    self.db.execute("DELETE FROM tabs WHERE tag = ? AND tab = ? AND node = ?",
                                    (tab.tag, tab.tab, node))  # fmt: skip
            self.db.execute("INSERT OR REPLACE INTO node_serials VALUES (?, ?)", (node, last))
            return _changed(before, self.online())

    def drop_nodes(self, nodes: Iterable[str]) -> set[str]:
        """Tabs on ``nodes`` (HaloD says they failed) are on no node until they sign on
        elsewhere; returns the users (identities) that went offline."""
        with self._txn():
            before = self.online()
            for node in nodes:
                self._drop_node(node)
            return _changed(before, self.online())

    def _drop_node(self, node: str) -> None:
        self.db.execute("UPDATE tabs SET node = NULL, seen = ? WHERE node = ?", (time.time(), node))
        self.db.execute("DELETE FROM node_serials WHERE node = ?", (node,))

    def clear_presence(self) -> None:
        """Forget every tab: the nodes were (re)started and have no one yet (pages that
        are still open sign on again when they reconnect)."""
        self.db.executescript("DELETE FROM tabs; DELETE FROM node_serials;")

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


def _changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return set(before) ^ set(after)
