"""HaloD's stores (docs/halod.md, "Store: SQLite or etcd").

``base``: what is persisted (typed values) and the interface every store implements;
``sqlite``: the embedded default; ``etcd``: the table in etcd v3, written by the elected
leader only (imported on its own: ``halod.store.etcd``).
"""

from halod.store.base import CorruptTable, Persisted, StoreError, TableStore
from halod.store.sqlite import SQLiteStore

Store = SQLiteStore  # the name halod.server uses

__all__ = ["CorruptTable", "Persisted", "SQLiteStore", "Store", "StoreError", "TableStore"]
