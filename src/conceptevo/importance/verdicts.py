"""Verdicts on the reversion claims, computed from the changes and their spread.

The paper's claims about Table 1 are: the more important the bin, the larger
the accuracy drop when its evolutions are reverted ("monotonic"), and
reverting a random share of the layer costs between the 25-50 and the 50-75
bins ("random between"). Each verdict is "yes", "no" or "cannot tell", with a
reason carrying the numbers.

The numbers: per run (one class, one repeat) the change of each bin averaged
over layers; a comparison between two bins is the mean over classes of their
paired difference, with a Student-t confidence interval. With two or more
repeats the spread is the repeats' spread within each class (the classes are
fixed strata: the variance of the mean is the sum of the per-class variances
of their means over the number of classes squared, with classes x (repeats -
1) degrees of freedom); with one repeat it is the spread across classes.

* "yes" needs every condition of the claim to hold with its interval clear of
  zero (an intersection of tests, each at the stated confidence);
* "no" needs one violation with its interval clear of zero (a union of tests,
  Bonferroni-corrected over the violations looked at);
* "cannot tell" otherwise, and before any test when the model's clean
  accuracy is at chance (nothing to lose: reverting cannot show a drop), when
  the split was not measured, or with fewer than 2 degrees of freedom.

For a metric where lower is better (log-loss) the claims read the other way
round (``lower_is_better=True``): the more important the bin, the larger the
*rise*; the decisions are those of the negated changes, and the reasons show
the numbers as measured.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

YES, NO, CANNOT_TELL = "yes", "no", "cannot tell"
Z_CHANCE = 2.33  # one-sided 99%: clean accuracy must clear chance by this many binomial standard errors


@dataclass(frozen=True)
class Verdict:
    """An answer ("yes", "no", "cannot tell") and the reason, with its numbers."""

    answer: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.answer}: {self.reason}" if self.reason else self.answer

    def __bool__(self):  # three answers do not fit a bool: `if verdict:` would treat "no" as true
        raise TypeError(f"a verdict is 'yes', 'no' or 'cannot tell', not a bool; compare verdict.answer == 'yes' ({self})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Interval:
    mean: float
    half: float

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    def __str__(self) -> str:
        return f"{self.mean:+.3f} ± {self.half:.3f}"


def interval(d: np.ndarray, confidence: float) -> _Interval:
    """Mean of ``d`` (``[classes, repeats]``) over classes and repeats, with its two-sided confidence half-width."""
    from scipy.stats import t

    k, r = d.shape
    if r >= 2:
        var = float((d.var(axis=1, ddof=1) / r).sum()) / k ** 2
        dof = k * (r - 1)
    elif k >= 2:
        var, dof = float(d[:, 0].var(ddof=1)) / k, k - 1
    else:
        return _Interval(float(d.mean()), math.inf)
    return _Interval(float(d.mean()), float(t.ppf(0.5 + confidence / 2, dof)) * math.sqrt(max(var, 0.0)))


def degrees_of_freedom(classes: int, repeats: int) -> int:
    return classes * (repeats - 1) if repeats >= 2 else classes - 1


def precheck(runs: np.ndarray, clean: np.ndarray, counts: np.ndarray, chance: float | None,
             accuracy: bool = True) -> Verdict | None:
    """"cannot tell" before any comparison, or None.

    ``runs``: ``[classes, repeats, variants]`` changes (averaged over
    layers); ``clean``: ``[classes, repeats]`` accuracy without reversion;
    ``counts``: images per run; ``chance``: the metric's chance level (None:
    unknown, then only a clean accuracy of 0 counts as chance). ``accuracy=False``
    (a loss, which reverting can always raise): no chance check.
    """
    if not np.isfinite(runs).all() or not np.isfinite(clean).all():
        return Verdict(CANNOT_TELL, "not measured on this split")
    k, r = runs.shape[:2]
    if degrees_of_freedom(k, r) < 2:
        return Verdict(CANNOT_TELL, f"too few repeats ({k} class(es) x {r} repeat(s)); use --repeats 3 or more")
    if not accuracy:
        return None
    n = int(np.sum(counts))
    acc = float(np.sum(clean * counts) / max(n, 1))
    if chance is None:
        if acc <= 0:
            return Verdict(CANNOT_TELL, "clean accuracy at chance (0.000): the model gets none of these images right, "
                                        "so reverting cannot lower it; check the model's inputs (normalisation, channels, class order)")
        return None
    bar = chance + Z_CHANCE * math.sqrt(chance * (1 - chance) / max(n, 1))
    if acc <= bar:
        return Verdict(CANNOT_TELL, f"clean accuracy at chance ({acc:.3f}, chance {chance:.3f}; {n} images over {k * r} runs): there is no "
                                    "accuracy for reverting to lower; check the model's inputs (normalisation, channels, class order)")
    return None


def _shown(iv: _Interval, sign: float) -> _Interval:
    """An interval of sign-flipped changes, back in the units measured."""
    return _Interval(sign * iv.mean, iv.half)


def monotonic(runs: np.ndarray, labels: list[str], confidence: float = 0.95, lower_is_better: bool = False) -> Verdict:
    """"The more important the bin, the larger the drop": ``runs`` is ``[classes, repeats, variants]``, bins first.

    With ``lower_is_better`` (log-loss): the larger the rise.
    """
    nb = len(labels)
    sign = -1.0 if lower_is_better else 1.0
    better = "lowered log-loss" if lower_is_better else "raised accuracy"
    means = runs[..., :nb].mean(axis=(0, 1))
    bins = sign * runs[..., :nb]
    alpha = 1 - confidence
    strict = 1 - alpha / nb  # "no" looks at nb - 1 steps and the most important bin: Bonferroni over nb tests
    shown = " / ".join(f"{m:+.3f}" for m in means)
    for i in range(nb - 1):
        step = interval(bins[..., i + 1] - bins[..., i], strict)
        if step.hi < 0:
            return Verdict(NO, f"reverting {labels[i]} cost less than reverting {labels[i + 1]} "
                               f"({means[i]:+.3f} vs {means[i + 1]:+.3f}; difference {-step.mean:+.3f} ± {step.half:.3f}); "
                               f"changes {shown} from most to least important")
    first_strict = interval(bins[..., 0], strict)
    if first_strict.lo > 0:
        return Verdict(NO, f"reverting the most important bin ({labels[0]}) {better} ({_shown(first_strict, sign)}); "
                           f"changes {shown}")
    first = interval(bins[..., 0], confidence)
    trend = interval(bins[..., -1] - bins[..., 0], confidence)
    # the trend in the units measured: last minus first bin for accuracy, first minus last for a loss
    trend_name = f"{labels[0]} minus {labels[-1]}" if lower_is_better else f"{labels[-1]} minus {labels[0]}"
    if first.hi < 0 and trend.lo > 0:
        return Verdict(YES, f"changes {shown} from most to least important; {trend_name} {trend} "
                            f"({confidence:.0%} CI)")
    raised = [labels[i] for i in range(nb) if interval(bins[..., i], confidence).lo > 0]
    note = f"; reverting {better} in {', '.join(raised)}" if raised else ""
    return Verdict(CANNOT_TELL, f"differences within noise (changes {shown}; {labels[0]} {_shown(first, sign)}, "
                                f"{trend_name} {trend}, {confidence:.0%} CI){note}")


def middle_bins(nb: int) -> tuple[int, int]:
    """The two bins a random share of the layer should land between: the middle ones (1 and 2 of 4)."""
    return (nb // 2 - 1, nb // 2) if nb % 2 == 0 else (nb // 2 - 1, nb // 2 + 1)


def random_between(runs: np.ndarray, labels: list[str], confidence: float = 0.95, lower_is_better: bool = False) -> Verdict:
    """"Reverting a random share costs between the middle bins": ``runs`` ``[classes, repeats, bins + 1]``, random last.

    With ``lower_is_better`` (log-loss) a cost is a rise; the differences in the reasons are then
    written the other way round (bin minus random, random minus bin), so that they stay in the units measured.
    """
    nb = len(labels)
    if nb < 3:
        return Verdict(CANNOT_TELL, f"needs at least 3 bins, there are {nb}")
    a, b = middle_bins(nb)
    means = runs.mean(axis=(0, 1))
    runs = -runs if lower_is_better else runs
    lo_b, hi_b = runs[..., a], runs[..., b]
    if hi_b.mean() < lo_b.mean():  # orient by the data: "between" either way round
        (a, lo_b), (b, hi_b) = (b, hi_b), (a, lo_b)
    rnd = runs[..., nb]
    shown = f"{labels[a]} {means[a]:+.3f}, random {means[nb]:+.3f}, {labels[b]} {means[b]:+.3f}"
    above_name = f"{labels[a]} minus random" if lower_is_better else f"random minus {labels[a]}"
    below_name = f"random minus {labels[b]}" if lower_is_better else f"{labels[b]} minus random"
    strict = 1 - (1 - confidence) / 2
    above, below = interval(rnd - lo_b, strict), interval(hi_b - rnd, strict)
    if above.hi < 0:
        return Verdict(NO, f"random cost more than {labels[a]} ({shown}; difference {above})")
    if below.hi < 0:
        return Verdict(NO, f"random cost less than {labels[b]} ({shown}; difference {-below.mean:+.3f} ± {below.half:.3f})")
    above, below = interval(rnd - lo_b, confidence), interval(hi_b - rnd, confidence)
    if above.lo > 0 and below.lo > 0:
        return Verdict(YES, f"{shown}; {above_name} {above}, {below_name} {below} ({confidence:.0%} CI)")
    return Verdict(CANNOT_TELL, f"differences within noise ({shown}; {above_name} {above}, "
                                f"{below_name} {below}, {confidence:.0%} CI)")


def both(first: Verdict, second: Verdict) -> Verdict:
    """The two claims together: "no" if either is no, "yes" if both are yes, else "cannot tell"."""
    if NO in (first.answer, second.answer):
        return Verdict(NO, "at least one of the claims does not hold")
    if first.answer == second.answer == YES:
        return Verdict(YES)
    return Verdict(CANNOT_TELL, "at least one of the claims cannot be decided")
