"""The web-app clients' resend policy (orbited/client/retry.py), with plain values."""

import pytest

from orbited.client.retry import RetryPolicy


def test_the_first_resend_goes_at_once_then_backoff_doubles_to_its_cap():
    policy = RetryPolicy(budget=5.0, backoff=0.05, max_backoff=0.3)
    assert [policy.pause(n) for n in range(1, 7)] == [0.0, 0.05, 0.1, 0.2, 0.3, 0.3]


def test_resends_stop_at_the_budget_or_the_retries_cap():
    policy = RetryPolicy(budget=5.0)
    assert policy.allows(started=100.0, resends=50, at=105.0)
    assert not policy.allows(started=100.0, resends=0, at=105.01)
    capped = RetryPolicy(budget=5.0, retries=2)
    assert capped.allows(100.0, 1, 100.1) and not capped.allows(100.0, 2, 100.1)
    assert not RetryPolicy(budget=0.0).allows(100.0, 0, 100.01)


def test_negative_settings_are_refused():
    for bad in ({"budget": -1}, {"backoff": -0.1}, {"retries": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
