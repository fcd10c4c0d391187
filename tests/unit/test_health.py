"""Tier health: one warning per outage, skip while down, back off only on failed retries."""

from __future__ import annotations

from kvtier.health import TierHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_on_failed_retries_only() -> None:
    clock = Clock()
    health = TierHealth("redis", retry_after_s=1.0, max_retry_s=4.0, clock=clock)
    assert health.available()
    for _ in range(6):  # six calls in flight when the server went away: one outage
        health.failed(ConnectionError("reset"))
    assert not health.available()
    clock.now += 1.0
    assert health.available()  # retry after 1 s, not 2**6 s
    health.failed(ConnectionError("still down"))  # the retry failed: wait 2 s
    clock.now += 1.5
    assert not health.available()
    clock.now += 0.5
    health.failed(ConnectionError("still down"))
    health.failed(ConnectionError("still down"))  # same window: no further doubling
    clock.now += 4.0
    health.failed(ConnectionError("still down"))
    clock.now += 3.9
    assert not health.available()  # capped at max_retry_s
    clock.now += 0.1
    assert health.available()
    health.succeeded()
    health.failed(ConnectionError("new outage"))
    clock.now += 1.0
    assert health.available()  # a new outage starts from retry_after_s again
