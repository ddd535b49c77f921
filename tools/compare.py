"""Is a difference between two groups of runs real, or within seed noise?

`verdict(candidate, baseline)` takes the test accuracies of each group's seeds and answers with Welch's
t-test (unequal variances, scipy.stats.ttest_ind): the mean difference, its 95% confidence interval, and
"better" when the whole interval is above 0, "worse" when below, "within seed noise" when it spans 0.
With fewer than two seeds in a group there is no noise estimate: the answer is "needs seeds".
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

BETTER, WORSE, NOISE, NEEDS_SEEDS = "better", "worse", "within seed noise", "needs seeds"
CONFIDENCE = 0.95
TEST = "Welch's t-test, 95% confidence interval of the difference in means"


@dataclass(frozen=True)
class Verdict:
    label: str                 # better | worse | within seed noise | needs seeds
    diff: float                # mean(candidate) - mean(baseline)
    low: float                 # the confidence interval of diff (nan without seeds)
    high: float
    p: float                   # two-sided p-value (nan without seeds)

    def __str__(self) -> str:
        if self.label == NEEDS_SEEDS:
            return f"{self.diff:+.4f}: needs seeds (one run per group gives no noise estimate; run 3 seeds)"
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}], p={self.p:.3g}: {self.label}"


def verdict(candidate: Sequence[float], baseline: Sequence[float]) -> Verdict:
    if not candidate or not baseline:
        raise ValueError("verdict: both groups need at least one run")
    diff = statistics.fmean(candidate) - statistics.fmean(baseline)
    if len(candidate) < 2 or len(baseline) < 2:
        return Verdict(NEEDS_SEEDS, diff, math.nan, math.nan, math.nan)
    if statistics.pvariance(candidate) == 0 and statistics.pvariance(baseline) == 0:
        # Identical seeds in both groups (e.g. one run repeated): no noise, so any difference is real.
        label = BETTER if diff > 0 else WORSE if diff < 0 else NOISE
        return Verdict(label, diff, diff, diff, 0.0 if diff else 1.0)
    result = stats.ttest_ind(candidate, baseline, equal_var=False)
    ci = result.confidence_interval(CONFIDENCE)
    label = BETTER if ci.low > 0 else WORSE if ci.high < 0 else NOISE
    return Verdict(label, diff, float(ci.low), float(ci.high), float(result.pvalue))
