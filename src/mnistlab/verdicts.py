"""How a measurement answers a question: the rules the notebooks and the submission document share.

A notebook states its answer from these rules, and the document (`mnistlab.tools.document`) reads
the numbers the notebook recorded in metrics.json through the same rules, so the two cannot give
different answers to the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

# |t| below this reads as run-to-run noise: about a two-sided 95% bound for a normal statistic.
NOISE_T = 2.0
# Class models (optional part 1): the share of images an independent network reads as their class
# for a plain "yes" or a "mostly", and the share of a real digit's template correlation that counts
# as digit-like.
JUDGE_YES, JUDGE_MOSTLY, REAL_RESEMBLANCE = 0.9, 0.5, 0.75


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's t statistic of mean(b) - mean(a) (sample variances); NaN with under two values in a group."""
    a_, b_ = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if len(a_) < 2 or len(b_) < 2:
        return float("nan")
    return float((b_.mean() - a_.mean()) / (a_.var() / len(a_) + b_.var() / len(b_)).sqrt())


def welch_reading(t: float | None) -> str:
    """'higher' or 'lower' (b against a, beyond noise), 'noise', or 'too few' (t NaN, or None as
    metrics.json stores NaN)."""
    if t is None or math.isnan(t):
        return "too few"
    if abs(t) < NOISE_T:
        return "noise"
    return "higher" if t > 0 else "lower"


def looks_like_a_number(
    evidence: dict[str, Any], real_correlation: float, real_match: float
) -> dict[str, Any]:
    """Two readings of a grid of class models (`class_models.class_evidence`'s dict).

    The independent network's: 'Yes', 'Mostly' or 'No' by the share it reads as the target class
    (`carries_class_evidence` when at least half). The pixels': `resemblance`, the images' template
    correlation as a share of what real digits reach, and `as_real` when their closest template is
    their own class as often as for real digits and the resemblance is at least REAL_RESEMBLANCE.
    """
    agreement = evidence["agreement"]
    resemblance = (
        evidence["template_correlation"] / real_correlation if real_correlation > 0 else math.nan
    )
    return {
        "judge": "Yes"
        if agreement >= JUDGE_YES
        else "Mostly"
        if agreement >= JUDGE_MOSTLY
        else "No",
        "carries_class_evidence": agreement >= JUDGE_MOSTLY,
        "resemblance": resemblance,
        "as_real": evidence["template_match"] >= real_match and resemblance >= REAL_RESEMBLANCE,
    }
