"""The statistics module against scipy / statsmodels where they compute the same quantity, and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pktransfer.ops.statistics import (
    bootstrap_p_two_sided,
    describe,
    equivalence_margin,
    equivalent,
    holm,
    paired_bootstrap,
    paired_difference,
    percentile_interval,
    tost_paired_t,
)


def test_holm_equals_statsmodels_on_random_families():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 20):
        p = rng.uniform(0, 0.2, size=m).tolist()
        want = multipletests(p, alpha=0.05, method="holm")[1]
        assert holm(p) == pytest.approx(list(want), abs=1e-12)


def test_holm_by_hand_keeps_order_and_leaves_nan_out():
    # sorted 0.01, 0.02, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.02 = 0.04, max(0.04, 0.04) = 0.04
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    got = holm([0.01, math.nan, 0.03])
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.03)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_tost_paired_t_equals_statsmodels():
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(1)
    for _ in range(5):
        a = rng.normal(0.6, 0.03, size=5)
        b = a + rng.normal(0.005, 0.01, size=5)
        for margin in (0.01, 0.03):
            want = ttost_paired(a, b, -margin, margin)[0]
            assert tost_paired_t(list(a), list(b), margin) == pytest.approx(want, rel=1e-9)


def test_describe_and_paired_difference_equal_scipy():
    from scipy import stats

    v = [0.62, 0.66, 0.607]
    d = describe(v)
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(v), scale=stats.sem(v))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi))
    a, b = {0: 0.66, 1: 0.633, 2: 0.64}, {0: 0.68, 1: 0.66, 2: 0.607}
    assert paired_difference(a, b)["p_value"] == pytest.approx(stats.ttest_rel([0.66, 0.633, 0.64], [0.68, 0.66, 0.607]).pvalue)


def test_bootstrap_tails_intervals_and_equivalence_by_hand():
    dist = np.linspace(-0.01, 0.03, 401)  # steps of 0.0001: 101 of the 401 values are at or below 0
    assert bootstrap_p_two_sided(dist) == pytest.approx(2 * 101 / 401)
    lo, hi = percentile_interval(dist, 0.9)
    assert (lo, hi) == pytest.approx((np.percentile(dist, 5), np.percentile(dist, 95)))
    inside = equivalent(dist, margin=0.035, alpha=0.05)
    assert inside["equivalent"] and inside["p"] == 0.0
    outside = equivalent(dist, margin=0.02, alpha=0.05)
    assert not outside["equivalent"] and outside["ci_high"] > 0.02
    assert outside["p"] == pytest.approx((dist >= 0.02).mean())


def test_paired_bootstrap_keeps_its_distribution_for_the_family_and_its_p_matches_it():
    a = {0: {f"i{k}": float(k % 3 == 0) for k in range(60)}, 1: {f"i{k}": float(k % 2 == 0) for k in range(60)}}
    b = {0: {f"i{k}": float(k % 4 == 0) for k in range(60)}, 1: {f"i{k}": float(k % 5 == 0) for k in range(60)}}
    r = paired_bootstrap(a, b, resamples=2000, seed=3)
    dist = r["distribution"]
    assert len(dist) == 2000 and r["p_two_sided"] == pytest.approx(bootstrap_p_two_sided(dist))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(percentile_interval(dist, 0.95))
    # the simultaneous interval for a family of 7 is wider than the single one
    lo7, hi7 = percentile_interval(dist, 1 - 0.05 / 7)
    assert lo7 <= r["ci_low"] and hi7 >= r["ci_high"]


def test_the_report_adjusts_the_family_and_calls_equivalence_only_with_a_margin():
    from pktransfer.study.analysis import summarize

    def rec(label, seed, scores):
        items = {f"i{k}": s for k, s in enumerate(scores)}
        return {
            "label": label,
            "seed": seed,
            "method": "lora",
            "metrics": {"test": sum(scores) / len(scores)},
            "items": {"test": items},
            "n_eval": {"test": len(scores)},
            "steps": 4,
            "final_loss": 0.1,
            "prepare_seconds": 0.0,
            "train_seconds": 0.0,
            "wall_seconds": 0.0,
            "peak_rss_anon_gib": 0.0,
            "peak_cuda_gib": 0.0,
            "spent": {},
            "teacher": {},
        }

    base = [1.0] * 50 + [0.0] * 50
    same = list(base)
    worse = [1.0] * 20 + [0.0] * 80
    records = (
        [rec("lora", s, base) for s in (0, 1)] + [rec("same", s, same) for s in (0, 1)] + [rec("worse", s, worse) for s in (0, 1)]
    )
    plain = summarize(records, "lora", resamples=2000)
    assert plain["family"]["test"]["comparisons"] == 2 and plain["family"]["test"]["margin"] is None
    w = plain["by_label"]["worse"]["paired_vs_baseline"]["test"]["bootstrap"]
    assert w["survives"] and w["p_adjusted"] <= 2 * w["p_two_sided"] and "equivalence" not in w
    same_b = plain["by_label"]["same"]["paired_vs_baseline"]["test"]["bootstrap"]
    assert not same_b["survives"]
    with_margin = summarize(records, "lora", resamples=2000, margin=0.02)
    assert with_margin["by_label"]["same"]["paired_vs_baseline"]["test"]["bootstrap"]["equivalence"]["equivalent"]
    assert not with_margin["by_label"]["worse"]["paired_vs_baseline"]["test"]["bootstrap"]["equivalence"]["equivalent"]
    import json

    json.dumps(with_margin)  # nothing unserialisable (the resampled distributions are dropped)


def test_the_equivalence_margin_by_hand_and_by_simulation():
    # z_0.95 = 1.6449, z_0.90 = 1.2816: 2.9264 standard errors
    assert equivalence_margin(0.01) == pytest.approx(0.029264, abs=1e-5)
    assert equivalence_margin(0.01, alpha=0.025, power=0.9) == pytest.approx((1.95996 + 1.64485) * 0.01, abs=1e-5)
    # a normal estimate of a true 0 with SE 1: the 90% interval inside ±margin in 80% of draws
    d = np.random.default_rng(0).normal(0.0, 1.0, 200_000)
    margin = equivalence_margin(1.0)
    assert ((d - 1.6449 > -margin) & (d + 1.6449 < margin)).mean() == pytest.approx(0.8, abs=0.005)
