"""HaloD route table core against the 2007 note's worked table and properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbited.core.routes import (
    MINIMAL,
    RouteTable,
    RouteTableError,
    add_node,
    canonical,
    format_ranges,
)

# the 2007 HaloD design note (docs/halod.md), corrected for the note's copying slip (21 for 22).
NOTE_24 = [
    "1-24",
    "1-12 || 13-24",
    "1-8 || 13-20 || 9-12,21-24",
    "1-6 || 13-18 || 9-12,21-22 || 7-8,19-20,23-24",
    "1-5 || 13-17 || 9-12,21 || 7-8,19-20,23 || 6,18,22,24",
    "1-4 || 13-16 || 9-12 || 7-8,19-20 || 6,18,22,24 || 5,17,21,23",
    "1-3 || 13-15 || 9-11 || 7-8,19-20 || 6,18,22,24 || 5,17,21,23 || 4,12,16",
    "1-3 || 13-15 || 9-11 || 7-8,19 || 6,18,22 || 5,17,21 || 4,12,16 || 20,23-24",
]


def line(table: dict[int, list[int]]) -> str:
    return " || ".join(format_ranges(table[i]) for i in sorted(table))


@pytest.mark.parametrize("nodes", range(1, 9))
def test_progression_matches_the_2007_note(nodes):
    assert line(canonical(24, nodes)) == NOTE_24[nodes - 1]


def test_each_add_moves_exactly_the_quota_to_the_new_node():
    table: dict[int, list[int]] = {}
    for m in range(1, 25):
        new = add_node(table, 24)
        moved = [r for i in table for r in table[i] if r not in new[i]]
        assert len(new[m]) == (24 if m == 1 else 24 // m)
        if m > 1:
            assert sorted(moved) == new[m]
        table = new
    with pytest.raises(RouteTableError):
        add_node(table, 24)


def names(n):
    return [f"n{i}" for i in range(1, n + 1)]


def test_spares_are_kept_and_take_over_a_failed_node():
    t = RouteTable(24, spares_wanted=1)
    roles = [t.join(n).role for n in names(4)]
    assert roles == ["active", "spare", "active", "active"]
    assert t.machines() == {1: "n1", 2: "n3", 3: "n4"} and t.spares == ["n2"]
    routes_of_n3 = t.table()[2]
    change = t.leave("n3")
    assert sorted(m.route for m in change.moves) == routes_of_n3
    assert {(m.old, m.new) for m in change.moves} == {("n3", "n2")}
    assert t.table() == canonical(24, 3) and t.machines()[2] == "n2" and t.spares == []


def test_without_spare_highest_node_replaces_the_failed_one():
    t = RouteTable(24, spares_wanted=0)
    for n in names(4):
        t.join(n)
    before = t.owners()
    change = t.leave("n2")
    assert t.table() == canonical(24, 3)
    assert t.machines() == {1: "n1", 2: "n4", 3: "n3"}
    # n2's routes now reach n4; n4's old routes 7-8,19-20,23-24 go back to nodes 1-3.
    assert {m.route for m in change.moves if m.old == "n2"} == {13, 14, 15, 16, 17, 18}
    assert all(before[m.route] in ("n2", "n4") for m in change.moves)
    assert {m.new for m in change.moves if m.old == "n4"} <= {"n1", "n4", "n3"}


def test_bad_membership_changes_are_refused_and_change_nothing():
    t = RouteTable(4)
    t.join("a")
    with pytest.raises(RouteTableError):
        t.join("a")
    with pytest.raises(RouteTableError):
        t.leave("nobody")
    assert t.table() == {1: [1, 2, 3, 4]}


def test_beyond_n_active_nodes_new_nodes_are_spares():
    t = RouteTable(3, spares_wanted=0)
    assert [t.join(n).role for n in names(5)] == ["active"] * 3 + ["spare"] * 2


# Hypothesis: N routes, spares wanted, and (join?, which member leaves) operations.
def join_fail_sequences(test):
    return settings(max_examples=150, deadline=None)(given(
        st.integers(min_value=1, max_value=4096),
        st.integers(min_value=0, max_value=2),
        st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=30)), max_size=40),
    )(test))  # fmt: skip


def assert_balanced(table: dict[int, list[int]], routes: int) -> None:
    """Every route has one owner; active nodes hold ≥ 1 route and differ by ≤ 1."""
    held = sorted(r for rs in table.values() for r in rs)
    assert held == (list(range(1, routes + 1)) if table else [])
    counts = [len(rs) for rs in table.values()]
    assert not counts or max(counts) - min(counts) <= 1
    assert min(counts, default=1) >= 1


@join_fail_sequences
def test_any_join_fail_sequence_keeps_the_table_canonical(routes, spares, ops):
    t = RouteTable(routes, spares_wanted=spares)
    counter = 0
    for join, pick in ops:
        members = [n for n in t.machines().values()] + t.spares
        if join or not members:
            counter += 1
            before = t.owners()
            change = t.join(f"x{counter}")
            after = t.owners()
            moved = {r for r in range(1, routes + 1) if before.get(r) != after.get(r)}
            assert {m.route for m in change.moves} == moved
            if change.role == "active" and len(t.machines()) > 1:
                assert len(moved) == routes // len(t.machines())  # the seed's quota, no more
        else:
            name = members[pick % len(members)]
            node, before, had_spare = t.node_id(name), t.table(), bool(t.spares)
            change = t.leave(name)
            if node is not None:  # an active node: as few moves as the policy implies
                expected = len(before[node])
                highest = max(before)
                if not had_spare and node != highest:
                    # M's routes go back, except those returning to id f (now M's machine)
                    after = canonical(routes, highest - 1)
                    expected += len([r for r in before[highest] if r not in after[node]])
                assert len(change.moves) == expected
        table = t.table()
        assert_balanced(table, routes)
        assert table == canonical(routes, len(table))
        assert sorted(table) == list(range(1, len(table) + 1))


@join_fail_sequences
def test_minimal_policy_moves_only_the_failed_nodes_routes(routes, spares, ops):
    t = RouteTable(routes, spares_wanted=spares, policy=MINIMAL)
    counter = 0
    for join, pick in ops:
        members = [n for n in t.machines().values()] + t.spares
        if join or not members:
            counter += 1
            change = t.join(f"x{counter}")
            if change.role == "active" and len(t.machines()) > 1:
                assert len(change.moves) == routes // len(t.machines())
        else:
            name = members[pick % len(members)]
            node, before = t.node_id(name), t.table()
            change = t.leave(name)
            if node is not None:
                assert sorted(m.route for m in change.moves) == before[node]
                assert all(m.old == name for m in change.moves)
        table = t.table()
        assert_balanced(table, routes)
        assert all(1 <= node <= routes for node in table)
        assert RouteTable.restore(t.snapshot()).snapshot() == t.snapshot()


def test_minimal_policy_without_spare_spreads_the_failed_routes():
    t = RouteTable(24, spares_wanted=0, policy=MINIMAL)
    for n in names(4):
        t.join(n)
    before = t.owners()
    change = t.leave("n2")
    assert sorted(m.route for m in change.moves) == [r for r, n in before.items() if n == "n2"]
    assert sorted(len(rs) for rs in t.table().values()) == [8, 8, 8]
    assert 2 not in t.table()
    assert t.join("n5").node_id == 2  # the freed id is reused


def test_snapshot_round_trip_and_bad_snapshots():
    t = RouteTable(24)
    for n in names(4):
        t.join(n)
    snap = t.snapshot()
    again = RouteTable.restore(snap)
    assert again.table() == t.table() and again.machines() == t.machines()
    assert again.spares == t.spares
    broken = {**snap, "nodes": {**snap["nodes"], "1": {"name": "n1", "routes": [1]}}}
    with pytest.raises(RouteTableError):
        RouteTable.restore(broken)
    with pytest.raises(RouteTableError):
        RouteTable.restore({"routes": "x"})


def test_format_ranges():
    assert format_ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    assert format_ranges([4]) == "4" and format_ranges([]) == ""


def test_seed_failover_in_a_large_cluster():
    """Regression: the canonical table was built recursively (RecursionError past ≈ 500
    nodes, found by `python -m bench control`)."""
    t = RouteTable(4096, spares_wanted=0)
    for n in names(1500):
        t.join(n)
    change = t.leave("n1")
    assert t.table() == canonical(4096, 1499)
    assert t.machines()[1] == "n1500"
    assert len(change.moves) >= len(canonical(4096, 1500)[1])


def test_canonical_equals_adding_one_by_one():
    table: dict[int, list[int]] = {}
    for m in range(1, 301):
        table = add_node(table, 300)
        assert canonical(300, m) == table
