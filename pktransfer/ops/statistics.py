"""Statistics for comparing methods, as small pure functions (numpy / scipy), each tested against scipy or
statsmodels where those compute the same quantity (tests/test_statistics.py).

- ``describe``, ``paired_difference``: per-seed summaries and the paired t-test (scipy).
- ``paired_bootstrap``: the two-level (seeds, then items) paired bootstrap of a difference in accuracy.
- ``holm``: Holm's step-down adjusted p-values for a family of comparisons (statsmodels' ``multipletests``).
- ``percentile_interval``: a bootstrap percentile interval at any level; at 1 − α/m for m comparisons it is a
  Bonferroni simultaneous interval (each family member's interval covers at once with probability ≥ 1 − α).
- ``equivalent``: two one-sided tests (TOST) against a margin from the bootstrap: shown equivalent when the
  (1 − 2α) interval lies inside (−margin, +margin); ``tost_paired_t`` is the seed-level t version (statsmodels'
  ``ttost_paired``).
- ``minimum_detectable_effect``, ``design_mde``: what a design can see; ``equivalence_margin``: the narrowest margin
  a design shows equivalence within, at a given power (the planted study's power calculation).
"""

from __future__ import annotations

import math
from typing import Any


def describe(values: list[float]) -> dict[str, float]:
    """n, mean, sample std and the 95% t-interval of the mean (nan where n < 2)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> dict[str, float]:
    """Mean paired difference (method − baseline) over the seeds both have, its 95% interval and the
    two-sided paired t-test p-value. Identical differences (zero spread) leave the t statistic undefined:
    p is nan (reported "n/a"), whether the differences are all zero or not."""
    from scipy import stats

    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    d = describe(diffs)
    p = math.nan
    if len(diffs) >= 2 and d["std"] > 0:
        p = float(stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return {
        "n": len(diffs),
        "mean_diff": d["mean"],
        "std": d["std"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
        "p_value": p,
        "seeds": seeds,
    }


def paired_bootstrap(
    method: dict[int, dict[str, float]],
    baseline: dict[int, dict[str, float]],
    *,
    resamples: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap of method − baseline over items x seeds (Efron & Tibshirani; the two-level resampling
    of Koehn 2004 / Dror et al. 2018 for seeds and test items).

    ``method`` and ``baseline`` map seed -> {item id: score (0/1 or a fraction)}; only seeds and items both
    have are used (same items, same seeds: the pairing). Each resample draws the seeds with replacement, then
    the items with replacement (the same items for every drawn seed, as the test set is shared), and takes
    the mean difference. Returns the observed mean difference, the 95% percentile interval, the bootstrap
    standard error, and the share of resamples with a difference <= 0 (a one-sided bootstrap p).
    """
    import numpy as np

    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return {"n_seeds": 0, "n_items": 0, "mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "se": math.nan}
    items = sorted(set.intersection(*(set(method[s]) & set(baseline[s]) for s in seeds)))
    if not items:
        return {
            "n_seeds": len(seeds),
            "n_items": 0,
            "mean_diff": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "se": math.nan,
        }
    d = np.array([[method[s][i] - baseline[s][i] for i in items] for s in seeds], dtype=np.float64)  # [S, N]
    rng = np.random.default_rng(seed)
    n_s, n_i = d.shape
    stats_ = np.empty(resamples)
    for b in range(0, resamples, 500):  # vectorised in blocks: [block, S] seed draws x [block, N] item draws
        m = min(500, resamples - b)
        si = rng.integers(0, n_s, size=(m, n_s))
        ii = rng.integers(0, n_i, size=(m, n_i))
        stats_[b : b + m] = d[si[:, :, None], ii[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(stats_, [2.5, 97.5])
    return {
        "n_seeds": n_s,
        "n_items": n_i,
        "mean_diff": float(d.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "se": float(stats_.std(ddof=1)),
        "p_le_zero": float((stats_ <= 0).mean()),
        "p_two_sided": bootstrap_p_two_sided(stats_),
        "resamples": resamples,
        "distribution": stats_,  # the resampled differences (dropped before anything is written)
    }


def minimum_detectable_effect(se: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at ``alpha`` detects with ``power``, given the standard
    error of the estimated difference: (z_{1−α/2} + z_{power}) · SE (2.80 · SE at the defaults)."""
    from scipy import stats

    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)


def equivalence_margin(se: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest TOST margin a design shows equivalence within, with probability ``power``, when the true difference
    is 0 and the estimate is normal with standard error ``se``: both one-sided tests at ``alpha`` reject when the
    (1 − 2α) interval d ± z_{1−α}·SE lies inside ±margin, i.e. |d| < margin − z_{1−α}·SE, which has probability
    ``power`` at margin = (z_{1−α} + z_{(1+power)/2})·SE (2.93·SE at the defaults)."""
    from scipy import stats

    return float((stats.norm.ppf(1 - alpha) + stats.norm.ppf((1 + power) / 2)) * se)


def design_mde(accuracy: float, n_items: int, n_seeds: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The MDE of a design if items were the only source of variance: two independent accuracies near ``accuracy``,
    each over n_items x n_seeds scores, SE = sqrt(2·p(1−p) / (n_items·n_seeds)). It is not a bound either way: pairing
    on the same items lowers the SE, and variance between seeds (training runs) raises it, sometimes by more (the MMLU
    study: 8 of 9 realised MDEs larger; the arithmetic study: 4 of 10); the grid's paired bootstrap SE gives the
    realised one."""
    p = min(max(accuracy, 0.0), 1.0)
    if n_items < 1 or n_seeds < 1:
        return math.nan
    return minimum_detectable_effect(math.sqrt(2 * p * (1 - p) / (n_items * n_seeds)), alpha=alpha, power=power)


def bootstrap_p_two_sided(distribution: Any) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller tail share of resampled differences at or
    beyond zero, capped at 1."""
    import numpy as np

    d = np.asarray(distribution, dtype=np.float64)
    if d.size == 0:
        return math.nan
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def percentile_interval(distribution: Any, level: float) -> tuple[float, float]:
    """The bootstrap percentile interval at ``level`` (e.g. 0.95; 1 − α/m for a Bonferroni simultaneous interval)."""
    import numpy as np

    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(distribution, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; nan entries are left out of the
    family and stay nan. Sorted ascending, p_(i) is multiplied by (m − i + 1), made monotone, capped at 1."""
    present = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    present.sort()
    m = len(present)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def equivalent(distribution: Any, margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """TOST against ``margin`` on the bootstrap distribution of a difference: each one-sided test at ``alpha``
    rejects when the (1 − 2α) percentile interval's end lies inside the margin on its side; equivalence is shown
    when both do. Returns the interval, the verdict and the TOST p-value (the larger one-sided bootstrap p)."""
    import numpy as np

    d = np.asarray(distribution, dtype=np.float64)
    low, high = percentile_interval(d, 1 - 2 * alpha)
    p = float(max((d <= -margin).mean(), (d >= margin).mean())) if d.size else math.nan
    return {"margin": margin, "ci_low": low, "ci_high": high, "equivalent": bool(-margin < low and high < margin), "p": p}


def tost_paired_t(a: list[float], b: list[float], margin: float) -> float:
    """The paired t TOST p-value for |mean(a − b)| < margin (the larger of the two one-sided p-values)."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return math.nan
    mean = sum(diffs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(n)
    p_low = float(stats.t.sf((mean + margin) / se, n - 1))  # H0: mean <= -margin
    p_high = float(stats.t.cdf((mean - margin) / se, n - 1))  # H0: mean >= +margin
    return max(p_low, p_high)
