import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.learner import policy as p


def inputs(**kw):
    base = dict(
        new_samples=0, feedback_accuracy=None, feedback_count=0, accepted_accuracy=None, label_psi=None
    )
    return p.TriggerInputs(**{**base, **kw})


def test_triggers_in_order():
    pol = p.TriggerPolicy(
        min_new_samples=100, accuracy_drop=0.05, min_feedback=20, drift_enabled=True, drift_threshold=0.2
    )
    assert p.training_reason(inputs(), pol) is None
    assert p.training_reason(inputs(manual=True, new_samples=1), pol) == "manual"
    assert p.training_reason(inputs(manual=True), pol) is None
    assert p.training_reason(inputs(new_samples=100), pol).startswith("new_samples")
    drop = inputs(new_samples=5, feedback_accuracy=0.7, feedback_count=30, accepted_accuracy=0.9)
    assert p.training_reason(drop, pol).startswith("accuracy_drop")
    # Too little feedback to trust the drop.
    assert (
        p.training_reason(
            inputs(new_samples=5, feedback_accuracy=0.7, feedback_count=5, accepted_accuracy=0.9), pol
        )
        is None
    )
    assert p.training_reason(inputs(new_samples=5, label_psi=0.3), pol).startswith("drift")
    assert p.training_reason(inputs(new_samples=5, scheduled_due=True), pol) == "schedule"
    # Nothing new to learn from: no round, whatever else says so.
    assert p.training_reason(inputs(label_psi=0.9, scheduled_due=True), pol) is None


def test_psi_zero_for_same_distribution_and_large_for_shift():
    a = {"x": 50, "y": 50}
    assert p.population_stability_index(a, {"x": 500, "y": 500}) == pytest.approx(0.0, abs=1e-9)
    assert p.population_stability_index(a, {"x": 90, "y": 10}) > 0.25


@given(
    st.dictionaries(st.sampled_from("abcde"), st.integers(1, 100), min_size=1),
    st.dictionaries(st.sampled_from("abcde"), st.integers(1, 100), min_size=1),
)
def test_psi_is_non_negative(a, b):
    assert p.population_stability_index(a, b) >= 0.0


def test_resource_guard():
    lim = p.ResourceLimits(
        max_cpu_percent=70, min_free_memory_mb=1000, max_temperature_c=80, max_inference_p99_ms=100
    )
    ok = p.Resources(
        cpu_percent=20, free_memory_mb=5000, max_temperature_c=50, inference_p99_ms=10, inference_queue=0
    )
    assert p.resource_refusal(ok, lim) is None
    assert "memory" in p.resource_refusal(p.Resources(20, 500, 50, 10, 0), lim)
    assert "cpu" in p.resource_refusal(p.Resources(90, 5000, 50, 10, 0), lim)
    assert "temperature" in p.resource_refusal(p.Resources(20, 5000, 95, 10, 0), lim)
    assert "p99" in p.resource_refusal(p.Resources(20, 5000, None, 500, 0), lim)


def rep(acc, per_class, n=100):
    return p.EvalReport(acc, per_class, n, {k: 20 for k in per_class})


def test_gate_promotes_improvement_and_refuses_regressions():
    pol = p.GatePolicy(epsilon=0.01, delta=0.05)
    active = {"older": rep(0.80, {"a": 0.8, "b": 0.8}), "recent": rep(0.60, {"a": 0.6, "b": 0.6})}
    better = {"older": rep(0.81, {"a": 0.82, "b": 0.80}), "recent": rep(0.85, {"a": 0.85, "b": 0.85})}
    assert p.promotion_decision(better, active, pol).promote
    forgets = {"older": rep(0.70, {"a": 0.6, "b": 0.8}), "recent": rep(0.90, {"a": 0.9, "b": 0.9})}
    d = p.promotion_decision(forgets, active, pol)
    assert not d.promote and any("older" in r for r in d.reasons)
    one_class = {"older": rep(0.80, {"a": 0.9, "b": 0.7}), "recent": rep(0.85, {"a": 0.85, "b": 0.85})}
    d = p.promotion_decision(one_class, active, pol)
    assert not d.promote and any("class b" in r for r in d.reasons)


def test_gate_ignores_classes_too_small_to_judge():
    pol = p.GatePolicy(delta=0.05, min_class_count=5)
    active = {"recent": p.EvalReport(0.8, {"a": 0.8, "rare": 1.0}, 100, {"a": 98, "rare": 2})}
    cand = {"recent": p.EvalReport(0.81, {"a": 0.82, "rare": 0.5}, 100, {"a": 98, "rare": 2})}
    assert p.promotion_decision(cand, active, pol).promote


def test_gate_tolerates_one_row_on_a_small_slice_but_not_two():
    pol = p.GatePolicy(epsilon=0.02)
    active = {"older": rep(0.90, {}, n=300), "recent": rep(17 / 19, {}, n=19)}
    one_row = {"older": rep(0.90, {}, n=300), "recent": rep(16 / 19, {}, n=19)}
    assert p.promotion_decision(one_row, active, pol).promote
    two_rows = {"older": rep(0.90, {}, n=300), "recent": rep(15 / 19, {}, n=19)}
    d = p.promotion_decision(two_rows, active, pol)
    assert not d.promote and d.reasons == ["recent: accuracy 0.789 < active 0.895 - 0.053"]
    # On a large slice epsilon, not one row, is the budget.
    forgets = {"older": rep(0.87, {}, n=300), "recent": rep(17 / 19, {}, n=19)}
    assert not p.promotion_decision(forgets, active, pol).promote


def test_evaluate_counts_per_class():
    r = p.evaluate(["a", "b", "a", "a"], ["a", "b", "b", "a"])
    assert (
        r.accuracy == 0.75 and r.per_class == {"a": 1.0, "b": 0.5} and r.per_class_count == {"a": 2, "b": 2}
    )
    with pytest.raises(ValueError):
        p.evaluate(["a"], [])


def test_rollback_only_with_enough_feedback():
    pol = p.RollbackPolicy(min_feedback=50, max_drop=0.05)
    assert p.rollback_reason(0.6, 10, 0.9, pol) is None
    assert p.rollback_reason(0.88, 100, 0.9, pol) is None
    assert "live accuracy" in p.rollback_reason(0.7, 100, 0.9, pol)
