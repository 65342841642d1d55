"""Paired bootstrap intervals of a cache's difference from the full cache (kvtool.evaluate.paired_bootstrap)."""

from __future__ import annotations

import pytest

from kvtool.evaluate import paired_bootstrap


def test_passkey_interval_is_a_count_and_pairs_the_samples():
    full = {"hits": "1100110011" * 4}
    assert paired_bootstrap(dict(full), full) == (0.0, 0.0)                  # same samples right: no difference
    flipped = {"hits": "".join("0" if c == "1" else "1" for c in full["hits"])}
    lo, hi = paired_bootstrap(flipped, full)
    assert -40 <= lo < 0 < hi <= 40                                         # 20/40 either way, different samples
    one_more = {"hits": "1" + full["hits"][1:]}                             # full got sample 0 right already
    assert paired_bootstrap(one_more, full) == (0.0, 0.0)
    gain = {"hits": full["hits"][:2] + "1" + full["hits"][3:]}              # sample 2: full wrong, this one right
    lo, hi = paired_bootstrap(gain, full)
    assert lo == 0.0 and 0 < hi < 3.5


def test_nll_interval_is_percent_of_the_full_cache():
    full = {"sample_nll": [2.0, 2.5, 3.0, 1.5, 2.2, 2.8]}
    worse = {"sample_nll": [x * 1.1 for x in full["sample_nll"]]}
    lo, hi = paired_bootstrap(worse, full)
    assert lo == pytest.approx(10.0) and hi == pytest.approx(10.0)
    mixed = {"sample_nll": [2.2, 2.4, 3.3, 1.4, 2.3, 2.7]}
    lo, hi = paired_bootstrap(mixed, full)
    assert lo < hi and lo < 5 < hi + 5


def test_no_interval_without_per_sample_results():
    assert paired_bootstrap({"nll": 2.0}, {"nll": 2.1}) is None
    assert paired_bootstrap({"hits": "10"}, {"hits": "101"}) is None
