"""The SQLite store behind the common interface (halod.store_base.TableStore).

(Draft location: becomes ``halod/store/sqlite.py``.) ``Store``'s own synchronous
``load``/``save``/``close`` are unchanged; ``read``/``write``/``shutdown`` give the same
results as already-fired Deferreds, so HaloD can drive either store the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from halod.store import Store
from halod.store_base import Persisted, StoreError


class SQLiteStore(Store):
    def read(self) -> Deferred[Persisted | None]:
        try:
            saved = self.load()
        except Exception as e:
            return fail(StoreError(f"reading {self.path}: {e}"))
        return succeed(None if saved is None else Persisted.from_snapshot(saved, self.version))

    def write(self, snapshot: Mapping[str, Any]) -> Deferred[Persisted]:
        try:
            persisted = Persisted.from_snapshot(snapshot, self.version + 1)
            self.save(dict(snapshot))
        except StoreError as e:
            return fail(e)
        except Exception as e:
            return fail(StoreError(f"writing {self.path}: {e}"))
        return succeed(persisted)

    def shutdown(self) -> Deferred[None]:
        self.close()
        return succeed(None)
