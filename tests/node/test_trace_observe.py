"""orbited.node.observe: the observer contract's fan-out."""

from __future__ import annotations

from typing import Any

from orbited.core.keys import ConnectionKey
from orbited.node.events import DispatchResult, EventRequest
from orbited.node.observe import Observers, build_observer

KEY = ConnectionKey("alice", "s1", "/chat")


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[Any, ...]] = []

    def dispatched(self, request: EventRequest, now: float) -> Any:
        self.calls.append(("dispatched", request.event_id, now))
        return f"token-{self.name}"

    def recipient(
        self, token: Any, key: ConnectionKey, route: int, status: str, *rest: Any
    ) -> None:
        self.calls.append(("recipient", token, key, route, status, *rest))

    def answered(self, token: Any, outcome: DispatchResult, now: float) -> None:
        self.calls.append(("answered", token, outcome.event_id, now))

    def written(self, *args: Any) -> None:
        self.calls.append(("written", *args))

    def acked(self, *args: Any) -> None:
        self.calls.append(("acked", *args))

    def noted(self, key: ConnectionKey, what: str, now: float, **detail: Any) -> None:
        self.calls.append(("noted", key, what, now, detail))

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]:
        return [{"from": self.name}]

    def import_(self, key: ConnectionKey, wire: list[Any], origin: str | None, now: float) -> None:
        self.calls.append(("import", key, wire, origin, now))


def test_build_observer_none_one_or_both() -> None:
    a, b = Recorder("a"), Recorder("b")
    assert build_observer(None, None) is None
    assert build_observer(a, None) is a
    assert build_observer(None, b) is b
    both = build_observer(a, b)
    assert isinstance(both, Observers) and both.parts == (a, b)


def test_observers_pass_each_part_its_own_token() -> None:
    a, b = Recorder("a"), Recorder("b")
    both = Observers([a, b])
    request = EventRequest("42", (KEY,), b"1", b"digest")
    token = both.dispatched(request, 5.0)
    assert token == ("token-a", "token-b")
    both.recipient(token, KEY, 3, "delivered", 7, "e.1", 0, "ws", 5.0)
    both.answered(token, DispatchResult("42", ()), 6.0)
    both.noted(KEY, "detach", 7.0, reason="slow")
    assert a.calls == [
        ("dispatched", "42", 5.0),
        ("recipient", "token-a", KEY, 3, "delivered", 7, "e.1", 0, "ws", 5.0),
        ("answered", "token-a", "42", 6.0),
        ("noted", KEY, "detach", 7.0, {"reason": "slow"}),
    ]
    assert b.calls[1][1] == "token-b" and b.calls[2][1] == "token-b"
    assert both.export(KEY) == [{"from": "a"}, {"from": "b"}]
    both.import_(KEY, [{"x": 1}], "n1", 8.0)
    assert a.calls[-1] == b.calls[-1] == ("import", KEY, [{"x": 1}], "n1", 8.0)
