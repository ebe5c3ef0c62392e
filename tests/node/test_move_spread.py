"""A planned move's reconnect spread (docs/protocol.md, "The reconnect spread hint"): the
browsers a route move sends away spread their reconnect over their own number, not the
whole node's, because only they come to the new owner."""

from __future__ import annotations

from orbited.core.hashing import route_of
from orbited.node.handoff import SPREAD_MAX, spread_for
from tests.conftest import keys_on_routes
from tests.node.test_hub import RecordingSink, make_hub


class MoveSink(RecordingSink):
    def __init__(self) -> None:
        super().__init__()
        self.told: tuple | None = None

    def reconnect(self, reason, route=None, spread=None):
        self.told = (reason, route, spread)


def test_spread_for_is_browsers_over_rate_rounded_up_and_bounded():
    assert spread_for(500, 1000.0) == 0.5
    assert spread_for(1, 400.0) == 0.003  # 2.5 ms, rounded up to the millisecond
    assert spread_for(10**9, 1.0) == SPREAD_MAX
    assert spread_for(500, 0.0) == 0.0


def test_a_route_move_spreads_the_browsers_it_moves_over_their_number():
    hub, _ = make_hub(reconnect_rate=100.0)
    hub.assign(range(1, 25))
    leaving = keys_on_routes([3], count=3)
    staying = keys_on_routes([7, 8], count=10, prefix="stay")
    sinks = {k: MoveSink() for k in [*leaving, *staying]}
    for key, sink in sinks.items():
        hub.attach(key, sink, None)
    node_wide = sinks[staying[-1]].frames[0]["spread"]  # the last hello: all 13 counted
    assert node_wide == spread_for(len(sinks), 100.0) == 0.13

    assert hub.route_moved({3: "tcp://127.0.0.9:9000"}, handoff=[3], exports=[]) == 3
    for key in leaving:  # 3 browsers at 100/s: 0.03 s, not the node's 0.13 s
        assert sinks[key].told == ("route_moved", 3, 0.03)  # with the key's route
    for key in staying:
        assert sinks[key].told is None

    # Routes HaloD takes away in an assignment are moves too.
    assert hub.assign([r for r in range(1, 25) if r not in (3, 7)]) > 0
    moved = [k for k in staying if sinks[k].told is not None]
    assert moved and all(
        sinks[k].told == ("route_moved", route_of(k), spread_for(len(moved), 100.0)) for k in moved
    )


def test_a_shutdown_reconnect_carries_no_move_spread():
    """Every browser of a stopping node comes back at once: the node-wide hint they have
    from hello and ping already counts them all."""
    hub, _ = make_hub(reconnect_rate=100.0)
    sink = MoveSink()
    hub.attach(keys_on_routes([1])[0], sink, None)
    hub.shutdown("shutdown")
    assert sink.told == ("shutdown", None, None)


def test_a_browser_that_comes_back_after_its_route_left_gets_the_moves_spread():
    """A long-poll between two polls misses the move's reconnect frame: its next poll
    reaches the old node, which tells it the spread the move's browsers had, not the
    node-wide one of its hello (which would delay it by up to that whole spread)."""
    hub, _ = make_hub(reconnect_rate=100.0)
    hub.assign(range(1, 25))
    leaving = keys_on_routes([3], count=3)
    staying = keys_on_routes([7, 8], count=10, prefix="stay")
    for key in [*leaving, *staying]:
        hub.attach(key, MoveSink(), None)
    hub.route_moved({3: "tcp://127.0.0.9:9000"}, handoff=[3], exports=[])
    between_polls = MoveSink()
    assert hub.attach(keys_on_routes([3], count=4)[3], between_polls, None) is None
    assert between_polls.told == ("route_moved", 3, 0.03)  # its 3 movers at 100/s

    # A route that comes back forgets the hint; leaving again with no browser, it has none
    # to spread: come at once.
    hub.assign(range(1, 25))
    hub.assign([r for r in range(1, 25) if r != 3])
    again = MoveSink()
    hub.attach(keys_on_routes([3], count=5)[4], again, None)
    assert again.told == ("route_moved", 3, 0.0)
