"""A token bucket, clock injected: to rate-limit what a peer may make us do per link
(PING, and any other control frame that costs work or an answer).

The bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second; each event
takes one (or ``n``). It starts full, so a peer within its rate never notices it. Time
comes in as ``now`` (seconds, any monotonic origin); a clock that steps backwards adds
nothing rather than taking tokens away.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["TokenBucket"]

_SLACK: Final = 1e-9  # tokens: so that take() at now + delay(now) succeeds despite float rounding


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

    def take(self, now: float, n: float = 1) -> bool:
        """Take ``n`` tokens if there are that many; False (nothing taken) if not. More
        than ``burst`` can never be taken. The one place tokens are refilled: a session
        calls it for every control frame its peer sends, so it is one call, not two."""
        if n < 0:
            raise ValueError("take() of a negative number of tokens")
        last = self._last
        tokens = self._tokens
        if last is None:
            self._last = now  # the time of the first call sets the origin
        elif now > last:  # a clock that steps backwards adds nothing
            tokens = tokens + (now - last) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self._last = now
        if n <= self.burst and tokens + _SLACK >= n:
            self._tokens = tokens - n if tokens > n else 0.0
            return True
        self._tokens = tokens
        return False

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``."""
        self.take(now, 0)  # refills, takes nothing
        return self._tokens

    def delay(self, now: float, n: float = 1) -> float:
        """Seconds from ``now`` until ``take(n)`` would succeed: 0 if it would now, ``inf``
        if it never can (``n > burst``, or no refill at rate 0)."""
        self.take(now, 0)  # refills, takes nothing
        missing = n - self._tokens
        if missing <= 0:
            return 0.0
        if n > self.burst or self.rate == 0:
            return math.inf
        return missing / self.rate
