"""A token bucket, clock injected: to rate-limit what a peer may make us do per link
(PING, and any other control frame that costs work or an answer).

The bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second; each event
takes one (or ``n``). It starts full, so a peer within its rate never notices it. Time
comes in as ``now`` (seconds, any monotonic origin); a clock that steps backwards adds
nothing rather than taking tokens away.
"""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]

_SLACK = 1e-9  # tokens: so that take() at now + delay(now) succeeds despite float rounding


class TokenBucket:
    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError("rate must be a finite number of tokens per second, at least 0")
        if not (math.isfinite(burst) and burst > 0):
            raise ValueError("burst must be a finite, positive number of tokens")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None  # the time of the first call sets the origin

    def _refill(self, now: float) -> None:
        last = self._last
        if last is None or now <= last:
            if last is None:
                self._last = now
            return
        self._tokens = min(self.burst, self._tokens + (now - last) * self.rate)
        self._last = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self._tokens

    def take(self, now: float, n: float = 1) -> bool:
        """Take ``n`` tokens if there are that many; False (nothing taken) if not. More
        than ``burst`` can never be taken."""
        if n < 0:
            raise ValueError("take() of a negative number of tokens")
        self._refill(now)
        if n <= self.burst and self._tokens + _SLACK >= n:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def delay(self, now: float, n: float = 1) -> float:
        """Seconds from ``now`` until ``take(n)`` would succeed: 0 if it would now, ``inf``
        if it never can (``n > burst``, or no refill at rate 0)."""
        self._refill(now)
        missing = n - self._tokens
        if missing <= 0:
            return 0.0
        if n > self.burst or self.rate == 0:
            return math.inf
        return missing / self.rate
