"""Sweep planning and the calibration-budget power law."""

import numpy as np
import pytest

from dmd.sweeps import FitSpec, plan_sweeps, power_law


def test_power_law_recovers_planted_exponent():
    B = np.array([10, 30, 100, 300, 1000])
    fitted = power_law(B, 2.5 / B**0.7)
    assert fitted["gamma"] == pytest.approx(0.7, abs=1e-12)
    assert fitted["C"] == pytest.approx(2.5, rel=1e-12)
    assert fitted["r2_log"] == pytest.approx(1.0)
    # noisy data: the least-squares slope in log-log space, as np.polyfit computes it
    rng = np.random.default_rng(0)
    err = 2.0 / B**0.5 * np.exp(rng.normal(0, 0.05, B.size))
    slope = np.polyfit(np.log(B), np.log(err), 1)[0]
    assert power_law(B, err)["gamma"] == pytest.approx(-slope, rel=1e-12)
    with pytest.raises(ValueError, match="two or more distinct budgets"):
        power_law([10, 10], [0.1, 0.2])


def test_plan_sweeps_varies_one_choice_at_a_time():
    base = FitSpec(span=(2, 3), solver="rrr", rank=8, alpha=1e-4)
    points = plan_sweeps(
        base,
        solvers=["ridge", "pcr", "rrr"],
        selections=["span", "endpoint", "identity"],
        ranks=[4, 16],
        alphas=[1e-6],
        budgets=[100, 10],
        cut_starts=[0, 1],
        prune_lengths=[1],
        token_groups=["cls"],
    )
    by = {}
    for pt in points:
        by.setdefault(pt.sweep, []).append(pt)
    assert [(p.spec.solver, p.spec.rank) for p in by["rank"]] == [
        ("pcr", 4),
        ("pcr", 16),
        ("rrr", 4),
        ("rrr", 16),
    ]
    assert [p.spec.solver for p in by["alpha"]] == ["ridge", "pcr", "rrr"]
    assert [p.spec.budget for p in by["budget"]] == [10, 100]
    assert [(p.spec.span, p.spec.selection) for p in by["cut_start"]] == [
        ((0, 3), "span"),
        ((0, 3), "endpoint"),
        ((0, 3), "identity"),
        ((1, 3), "span"),
        ((1, 3), "endpoint"),
        ((1, 3), "identity"),
    ]
    assert {p.spec.span for p in by["prune_length"]} == {(2, 1)}
    assert by["token_group"][0].spec.group == "cls" and by["token_group"][0].spec.rank == 8
    assert len({p.name for p in points}) == len(points)
