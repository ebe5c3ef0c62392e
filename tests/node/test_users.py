"""Per-user state (orbited.node.users) and the hub's per-user index and limits."""

from __future__ import annotations

import math

import pytest

from orbited.core.settings import FieldError
from orbited.node.users import UserLimits, gcra_take

# -- gcra_take -------------------------------------------------------------------------


def test_gcra_allows_a_burst_then_one_per_interval():
    tat, now = 0.0, 100.0
    allowed = 0
    for _ in range(10):
        ok, tat, retry = gcra_take(tat, now, rate=2.0, burst=4)
        allowed += ok
    assert allowed == 4
    ok, tat2, retry = gcra_take(tat, now, 2.0, 4)
    assert not ok and tat2 == tat and retry == pytest.approx(0.5)
    ok, tat, _ = gcra_take(tat, now + 0.5, 2.0, 4)  # after retry_after: one more
    assert ok
    assert not gcra_take(tat, now + 0.5, 2.0, 4)[0]


def test_gcra_refills_to_the_burst_and_no_further():
    ok, tat, _ = gcra_take(0.0, 10.0, 1.0, 3)
    for _ in range(2):
        ok, tat, _ = gcra_take(tat, 10.0, 1.0, 3)
        assert ok
    assert not gcra_take(tat, 10.0, 1.0, 3)[0]
    later = 1000.0  # a long idle time refills 3, not more
    results = []
    for _ in range(5):
        ok, tat, _ = gcra_take(tat, later, 1.0, 3)
        results.append(ok)
    assert results == [True, True, True, False, False]


def test_gcra_a_steady_rate_at_the_limit_is_never_refused():
    tat, now = 0.0, 0.0
    for _ in range(1000):
        ok, tat, _ = gcra_take(tat, now, 3.0, 1)
        assert ok
        now += 1 / 3


def test_gcra_burst_one_refuses_a_second_at_once_with_the_interval_as_retry():
    ok, tat, _ = gcra_take(0.0, 5.0, 4.0, 1)
    ok2, _, retry = gcra_take(tat, 5.0, 4.0, 1)
    assert ok and not ok2 and retry == pytest.approx(0.25)


# -- UserLimits ------------------------------------------------------------------------


def test_user_limits_defaults_are_off():
    limits = UserLimits()
    assert limits.max_connections == 0 and limits.rate == 0 and limits.policy == "refuse"
    assert limits.burst >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        ({"max_connections": -1}, "max_connections must not be negative"),
        ({"rate": -0.5}, "rate must not be negative"),
        ({"rate": math.nan}, "rate must not be negative"),
        ({"rate": math.inf}, "rate must be finite"),
        ({"burst": 0}, "burst must be at least 1"),
        ({"burst": 0, "rate": 5.0}, "burst must be at least 1"),
        ({"policy": "close_newest"}, "policy must be refuse or close_oldest"),
        ({"hold": -1.0}, "hold must not be negative"),
    ],
)  # fmt: skip
def test_user_limits_refuse_bad_values(args, message):
    with pytest.raises(FieldError, match=message):
        UserLimits(**args)
