"""The whole run's remaining time: what it sums, and that it waits for the times it needs."""

from __future__ import annotations

import pytest

from workers.pipeline.run_estimate import STAGE_B_COST, RunEstimate, fmt_duration


def _estimate(**kw) -> RunEstimate:
    est = RunEstimate({"a": 10, "b": 4}, {"a": 1024, "b": 2048}, **kw)
    return est


def test_unknown_until_measured():
    est = _estimate()
    assert est.remaining("a") is None
    est.step_s["a"] = 2.0
    assert est.remaining("a") is None  # the validation's cost is not known yet
    assert "left" not in est.line("a") and "so far" in est.line("a")


def test_sums_steps_left_and_validation():
    est = _estimate(load_s=5.0, teacher_eval_s=20.0, sea_over_dense=1.5)
    est.step_s["a"] = 2.0
    b_step = 2.0 * STAGE_B_COST * 2048 / 1024  # stage B not timed yet: stage A's step, scaled
    after = 20.0 * 1.5 + 5.0
    assert est.after_distill() == pytest.approx(after)
    assert est.remaining("a", 3) == pytest.approx(7 * 2.0 + 4 * b_step + after)
    est.step_s["b"] = 3.0  # measured replaces the assumption
    assert est.remaining("b", 1) == pytest.approx(3 * 3.0 + after)
    assert est.remaining("distill") == pytest.approx(after)
    assert "about 35s left" in est.line("distill")


def test_a_only_recipe():
    est = RunEstimate({"a": 4}, {"a": 256}, load_s=1.0, teacher_eval_s=2.0, sea_over_dense=2.0)
    est.step_s["a"] = 0.5
    assert est.remaining("a", 2) == pytest.approx(2 * 0.5 + 5.0)


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59.6, "1m00s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (7322, "2h02m"), (-3, "0s")])
def test_fmt_duration(seconds, text):
    assert fmt_duration(seconds) == text
