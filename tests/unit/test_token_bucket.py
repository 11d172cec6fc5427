"""The infer/req rate limit: a burst of one second's worth, then the rate; a new rate starts full."""

import time

from agent.daemon.inference import TokenBucket


def test_burst_then_rate():
    b = TokenBucket()
    assert sum(b.take(10) for _ in range(100)) == 10  # the burst
    time.sleep(0.25)
    assert 1 <= sum(b.take(10) for _ in range(100)) <= 4  # ~2.5 tokens came back
    assert sum(b.take(1000) for _ in range(2000)) >= 1000  # a new rate: full again


def test_a_rate_below_one_still_lets_one_through():
    b = TokenBucket()
    assert b.take(0.5) is True and b.take(0.5) is False
