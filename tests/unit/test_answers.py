"""How long a give-back waits: soon after a short outage, never hammering a store that stays broken."""

from __future__ import annotations

from ocbridge.bridge.jetstream.answers import FIRST_RETRY_DELAY, backoff


def test_a_give_back_waits_half_a_second_then_doubles_up_to_the_retry_delay():
    delays = [backoff(delivered, cap=5.0) for delivered in range(1, 8)]
    assert delays == [FIRST_RETRY_DELAY, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff(10_000, cap=5.0) == 5.0  # no overflow however often it was delivered
    assert backoff(1, cap=0.2) == 0.2  # a retry delay below the first step caps it too
