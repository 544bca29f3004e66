"""95% intervals: Wilson for proportions, the paired interval for an accuracy change."""

import numpy as np
import pytest

from featx_edge.fidelity.gate import compare
from featx_edge.fidelity.intervals import paired_difference, wilson


def test_wilson_matches_published_values():
    # Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-4)
    assert wilson(0, 538)[0] == 0.0 and wilson(538, 538)[1] == 1.0  # exact at the ends
    low, high = wilson(270, 270)
    assert high == 1.0 and 0.98 < low < 0.99  # all agree on 270 images still leaves ~1.4 points open


def test_wilson_narrows_with_more_images():
    widths = [np.subtract(*wilson(round(0.98 * n), n)[::-1]) for n in (100, 1000, 10000)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_paired_difference_is_centred_and_covers_zero_for_balanced_changes():
    low, high = paired_difference(3, 3, 270)
    assert low < 0 < high and low == pytest.approx(-high)
    # The paired interval is far tighter than two independent ones (about 0.07 wide at 95%).
    assert high - low < 0.05
    low, high = paired_difference(0, 12, 270)  # 12 images lost, none gained: a real drop
    assert high < 0


def test_compare_reports_intervals_and_counts():
    rng = np.random.default_rng(0)
    reference = rng.dirichlet(np.ones(4), size=200)
    labels = reference.argmax(1)
    probs = reference.copy()
    probs[:6] = np.roll(probs[:6], 1, axis=1)  # 6 disagreements
    m = compare(probs, reference, labels)
    assert m["disagreements"] == 6 and m["top1_agreement"] == pytest.approx(0.97)
    low, high = m["top1_agreement_ci95"]
    assert low < 0.97 < high
    assert m["images_lost"] - m["images_gained"] == pytest.approx(-m["accuracy_change_points"] * 2)
    c_low, c_high = m["accuracy_change_ci95_points"]
    assert c_low < m["accuracy_change_points"] < c_high
