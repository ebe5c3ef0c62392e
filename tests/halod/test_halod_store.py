"""The SQLite store: what is saved is what is restored, and operators can read it."""

import sqlite3

from halod.membership import Membership, Timing
from halod.store import Store
from orbited.core.routes import RouteTable
from tests.halod.test_halod_membership import reg


def test_save_load_and_operator_tables(tmp_path):
    m = Membership(RouteTable(24, 1), Timing())
    for name in ("a", "b", "c"):
        m.register(reg(name), 0.0)
    store = Store(tmp_path / "halod.sqlite3")
    store.save(m.snapshot())
    store.save(m.snapshot())
    store.close()
    again = Store(tmp_path / "halod.sqlite3")
    assert again.version == 2 and again.load() == m.snapshot()
    db = sqlite3.connect(tmp_path / "halod.sqlite3")
    row = db.execute("SELECT count(*), min(route), max(route) FROM routes").fetchone()
    assert row == (24, 1, 24)
    roles = dict(db.execute("SELECT name, role FROM nodes"))
    assert roles == {"a": "active", "b": "spare", "c": "active"}


def test_empty_store_loads_nothing(tmp_path):
    assert Store(tmp_path / "x" / "new.sqlite3").load() is None
