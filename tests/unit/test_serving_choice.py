"""The gate's choice per box among the candidate's transformer, linear and combined models."""

from agent.learner import policy as p


def report(acc: float, count: int = 100, per_class: dict[str, float] | None = None) -> p.EvalReport:
    per_class = per_class or {"a": acc, "b": acc}
    return p.EvalReport(acc, per_class, count, dict.fromkeys(per_class, count // 2))


def slices(older: float, recent: float, **kw) -> dict[str, p.EvalReport]:
    return {"older": report(older, **kw), "recent": report(recent, **kw), "all": report((older + recent) / 2)}


GATE = p.GatePolicy(epsilon=0.02, delta=0.10, min_class_count=20)


def test_the_linear_model_serves_where_the_transformer_is_worse():
    models = {
        "transformer": slices(0.80, 0.60),
        "linear": slices(0.95, 0.93),
        "combined": slices(0.90, 0.85),
    }
    choice = p.serving_choice(models, GATE)
    assert choice.model == "linear", choice.reasons


def test_the_transformer_serves_where_the_linear_model_is_worse():
    models = {
        "transformer": slices(0.95, 0.93),
        "linear": slices(0.80, 0.60),
        "combined": slices(0.90, 0.85),
    }
    choice = p.serving_choice(models, GATE)
    assert choice.model == "transformer"
    assert any("linear regresses" in r for r in choice.reasons)


def test_combined_serves_by_default_and_a_lead_within_noise_does_not_switch():
    models = {
        "transformer": slices(0.90, 0.88),
        "linear": slices(0.90, 0.88),
        "combined": slices(0.94, 0.92),
    }
    assert p.serving_choice(models, GATE).model == "combined"
    tie = {**models, "combined": slices(0.90, 0.88)}
    assert p.serving_choice(tie, GATE).model == "combined"
    # One point ahead on 100 rows (the standard error at 0.89 is 3 points): combined stays.
    near = {**tie, "linear": slices(0.91, 0.89)}
    choice = p.serving_choice(near, GATE)
    assert choice.model == "combined" and any("not above combined" in r for r in choice.reasons)
    # Far ahead: the single model serves.
    far = {**tie, "transformer": slices(0.97, 0.95)}
    assert p.serving_choice(far, GATE).model == "transformer"


def test_a_combination_that_regresses_leaves_the_transformer_as_default():
    models = {
        "transformer": slices(0.95, 0.80),
        "combined": slices(0.85, 0.95),  # forgets older beyond epsilon
    }
    choice = p.serving_choice(models, GATE)
    assert choice.model == "transformer" and any("combined regresses" in r for r in choice.reasons)


def test_better_overall_but_a_regression_on_one_slice_keeps_the_transformer():
    # Much better on recent, but forgets older beyond epsilon: the no-regression rule holds.
    models = {"transformer": slices(0.95, 0.50), "linear": slices(0.88, 0.99)}
    choice = p.serving_choice(models, GATE)
    assert choice.model == "transformer" and "older" in " ".join(choice.reasons)
    # A class that falls by more than delta vetoes too.
    models = {
        "transformer": slices(0.90, 0.90, per_class={"a": 0.9, "b": 0.9}),
        "linear": slices(0.93, 0.93, per_class={"a": 1.0, "b": 0.7}),
    }
    assert p.serving_choice(models, GATE).model == "transformer"


def test_without_evaluations_the_transformer_serves():
    assert p.serving_choice({}, GATE).model == "transformer"
    assert p.serving_choice({"linear": slices(1.0, 1.0)}, GATE).model == "transformer"
