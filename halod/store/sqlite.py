"""Durable route table: every change is written to SQLite before nodes hear of it.

Owns the on-disk layout (docs/halod.md, "Persistence"): readable tables for operators
(``nodes``, ``routes``) plus the exact snapshot HaloD restores from, written in one
transaction so a crash leaves either the old or the new table, never a mix.

The synchronous ``load``/``save``/``close`` are what HaloD calls today; ``read``/``write``/
``shutdown`` are the common store interface (halod.store.base.TableStore), the same
results as already-fired Deferreds, so HaloD can drive SQLite and etcd the same way.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from halod.store.base import Persisted, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), saved_at REAL,
                                     version INTEGER, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, node_id INTEGER, role TEXT,
                                  browser TEXT, sp TEXT, capacity INTEGER);
CREATE TABLE IF NOT EXISTS routes (route INTEGER PRIMARY KEY, node_id INTEGER, name TEXT);
"""


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a saved change survives power loss
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT coalesce(max(version), 0) FROM snapshot").fetchone()
        self.version: int = row[0]

    def load(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM snapshot WHERE id = 1").fetchone()
        return None if row is None else json.loads(row[0])

    def save(self, snapshot: dict[str, Any]) -> None:
        table = snapshot["table"]
        node_ids = {entry["name"]: int(n) for n, entry in table["nodes"].items()}
        drained = set(snapshot.get("drained", []))
        self.version += 1
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO snapshot VALUES (1, ?, ?, ?)",
                (time.time(), self.version, json.dumps(snapshot, separators=(",", ":"))),
            )
            db.execute("DELETE FROM nodes")
            db.executemany(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        name,
                        node_ids.get(name),
                        "active" if name in node_ids else "drained" if name in drained else "spare",
                        r["browser"],
                        r["sp"],
                        r["capacity"],
                    )  # fmt: skip
                    for name, r in snapshot["nodes"].items()
                ],
            )
            db.execute("DELETE FROM routes")
            db.executemany(
                "INSERT INTO routes VALUES (?, ?, ?)",
                [
                    (route, int(n), entry["name"])
                    for n, entry in table["nodes"].items()
                    for route in entry["routes"]
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    # -- the common interface (halod.store.base.TableStore) --------------------------------

    def read(self) -> Deferred[Persisted | None]:
        try:
            saved = self.load()
            table = None if saved is None else Persisted.from_snapshot(saved, self.version)
        except StoreError as e:
            return fail(e)
        except Exception as e:
            return fail(StoreError(f"reading {self.path}: {e}"))
        return succeed(table)

    def write(self, snapshot: Mapping[str, Any]) -> Deferred[Persisted]:
        try:
            table = Persisted.from_snapshot(snapshot, self.version + 1)
            self.save(dict(snapshot))
        except StoreError as e:
            return fail(e)
        except Exception as e:
            return fail(StoreError(f"writing {self.path}: {e}"))
        return succeed(table)

    def shutdown(self) -> Deferred[None]:
        self.close()
        return succeed(None)
