"""95% intervals for the figures verify reports, so a claim of "1 point" can be checked.

- A proportion (top-1 agreement, accuracy): the Wilson score interval, which stays inside
  [0, 1] and behaves near 100% where the normal approximation does not.
- A change in accuracy between two models on the *same* images: the paired (McNemar-style)
  difference with the Bonett-Price adjusted Wald interval, built from the discordant pairs
  (images one model gets right and the other wrong). Images both get right or wrong say
  nothing about the difference, which is why a paired interval is much tighter than two
  independent ones.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes / n``; (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n the bound is exactly 0 or 1 (floating point would leave ~1e-17).
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def paired_difference(gained: int, lost: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Interval of (accuracy of B) - (accuracy of A) on the same ``n`` items, as a fraction.

    Args:
        gained: items B gets right and A gets wrong.
        lost: items A gets right and B gets wrong.
        n: all items.
    """
    if n <= 0:
        return -1.0, 1.0
    p_gain = (gained + 1) / (n + 2)
    p_lost = (lost + 1) / (n + 2)
    diff = p_gain - p_lost
    se = math.sqrt(max(0.0, (p_gain + p_lost - diff * diff) / (n + 2)))
    return max(-1.0, diff - z * se), min(1.0, diff + z * se)
