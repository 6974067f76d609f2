"""The rules that turn measurements into yes/no answers (mnistlab.verdicts), against hand-computed cases."""

from __future__ import annotations

import math
import statistics

import pytest

from mnistlab.verdicts import looks_like_a_number, welch_reading, welch_t


def test_welch_t_matches_a_hand_computed_case():
    # a: mean 2, sample variance 1; b: mean 6, sample variance 4.
    # t = (6 - 2) / sqrt(1/3 + 4/3) = 4 / sqrt(5/3) = 3.0983866769659336
    assert welch_t([1, 2, 3], [4, 6, 8]) == pytest.approx(4 / math.sqrt(5 / 3), rel=1e-12)
    assert welch_t([4, 6, 8], [1, 2, 3]) == pytest.approx(-4 / math.sqrt(5 / 3), rel=1e-12)


def test_welch_t_agrees_with_the_formula_on_unequal_groups():
    a, b = [0.9945, 0.9936, 0.9942, 0.9950], [0.9931, 0.9948]
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    expected = (statistics.fmean(b) - statistics.fmean(a)) / se
    assert welch_t(a, b) == pytest.approx(expected, rel=1e-9)


def test_welch_t_needs_two_values_in_each_group():
    assert math.isnan(welch_t([1.0], [1.0, 2.0]))
    assert math.isnan(welch_t([1.0, 2.0], [3.0]))


def test_welch_reading_has_a_noise_band_and_reads_metrics_json_nan():
    assert welch_reading(3.1) == "higher" and welch_reading(-2.0) == "lower"
    assert welch_reading(1.99) == welch_reading(-1.99) == welch_reading(0.0) == "noise"
    assert welch_reading(float("nan")) == welch_reading(None) == "too few"


def evidence(agreement, correlation, match):
    return {"agreement": agreement, "template_correlation": correlation, "template_match": match}


def test_looks_like_a_number_reads_the_judge_and_the_pixels():
    real_correlation, real_match = 0.8, 0.9
    yes = looks_like_a_number(evidence(0.99, 0.64, 0.95), real_correlation, real_match)
    assert yes == {
        "judge": "Yes",
        "carries_class_evidence": True,
        "resemblance": pytest.approx(0.8),
        "as_real": True,
    }
    mostly = looks_like_a_number(evidence(0.5, 0.59, 0.95), real_correlation, real_match)
    assert mostly["judge"] == "Mostly" and mostly["carries_class_evidence"]
    assert not mostly["as_real"]  # resemblance 0.7375 < 0.75
    no = looks_like_a_number(evidence(0.49, 0.7, 0.89), real_correlation, real_match)
    assert no["judge"] == "No" and not no["carries_class_evidence"]
    assert not no["as_real"]  # its closest template is its own class less often than real digits'
    blank = looks_like_a_number(evidence(0.0, 0.1, 1.0), 0.0, 0.0)
    assert math.isnan(blank["resemblance"]) and not blank["as_real"]
