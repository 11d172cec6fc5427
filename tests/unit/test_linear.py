"""The fast learner's artifact: fit, save, load, and bad files refused with a clear error."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from agent.linear import (
    LINEAR_CONFIG,
    LINEAR_WEIGHTS,
    LinearConfig,
    LinearModelError,
    combine_log_probs,
    fit_linear,
    fit_weight,
    read_linear,
    read_serving,
    save_linear,
    write_serving,
)
from tests.tiny import TINY_LABELS, keyword_samples

SMALL = 1 << 12  # a small hash space keeps the files and the tests small


@pytest.fixture(scope="module")
def model():
    rows = keyword_samples(120, seed=1)
    return fit_linear(
        [t for t, _ in rows],
        [lab for _, lab in rows],
        TINY_LABELS,
        LinearConfig(TINY_LABELS, n_features=SMALL),
    )


def test_fit_learns_keywords_and_round_trips_exactly(model, tmp_path):
    test = keyword_samples(80, seed=2)
    texts = [t for t, _ in test]
    assert np.mean([p == lab for p, (_, lab) in zip(model.predict(texts), test, strict=True)]) > 0.9
    save_linear(tmp_path, model)
    back = read_linear(tmp_path, TINY_LABELS)
    assert back is not None and back.config == model.config
    np.testing.assert_array_equal(back.log_proba(texts), model.log_proba(texts))
    # Rows follow the bundle's label order, whatever order the file has.
    again = read_linear(tmp_path, list(reversed(TINY_LABELS)))
    assert again is not None
    np.testing.assert_allclose(again.log_proba(texts)[:, ::-1], model.log_proba(texts), atol=1e-5)


def test_sparse_fast_path_matches_the_matrix_product(model):
    texts = [t for t, _ in keyword_samples(10, seed=3)] + ["", "!!"]
    z = np.asarray(model.features(texts) @ model.coef.T) + model.intercept
    ref = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    np.testing.assert_allclose(model.log_proba(texts), ref, atol=1e-5)


def test_a_class_absent_from_training_is_never_predicted_and_stays_finite():
    rows = [(t, lab) for t, lab in keyword_samples(80, seed=4) if lab != "thermal"]
    m = fit_linear(
        [t for t, _ in rows],
        [lab for _, lab in rows],
        TINY_LABELS,
        LinearConfig(TINY_LABELS, n_features=SMALL),
    )
    assert np.isfinite(m.coef).all() and "thermal" not in m.predict([t for t, _ in keyword_samples(40, 5)])
    with pytest.raises(ValueError, match="two classes"):
        fit_linear(["a", "b"], ["normal", "normal"], TINY_LABELS)


def test_no_linear_files_is_none_and_serving_defaults_to_transformer(tmp_path):
    assert read_linear(tmp_path, TINY_LABELS) is None
    assert read_serving(tmp_path) == "transformer"
    write_serving(tmp_path, "combined", ["better on all"])
    assert read_serving(tmp_path) == "combined"
    (tmp_path / "serving.json").write_text('{"model": "magic"}')
    with pytest.raises(LinearModelError, match="magic"):
        read_serving(tmp_path)


def _tamper_arrays(d, **changes):
    arrays = load_file(str(d / LINEAR_WEIGHTS))
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v(arrays[k])
    save_file(arrays, str(d / LINEAR_WEIGHTS))


def _tamper_config(d, **changes):
    cfg = json.loads((d / LINEAR_CONFIG).read_text())
    cfg.update(changes)
    (d / LINEAR_CONFIG).write_text(json.dumps(cfg))


def _nan(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: (d / LINEAR_WEIGHTS).unlink(), "linear_model.safetensors is missing"),
        (lambda d: (d / LINEAR_CONFIG).unlink(), "linear_config.json is missing"),
        (lambda d: (d / LINEAR_WEIGHTS).write_bytes(b"not safetensors"), "unreadable"),
        (lambda d: (d / LINEAR_CONFIG).write_text("{"), "not valid JSON"),
        (lambda d: _tamper_arrays(d, coef=lambda a: a[:, :-1]), "coef shape"),
        (lambda d: _tamper_arrays(d, intercept=lambda a: a[:-1]), "intercept shape"),
        (lambda d: _tamper_arrays(d, coef=_nan), "coef contains NaN"),
        (lambda d: _tamper_arrays(d, idf=lambda a: np.full_like(a, np.inf)), "idf contains NaN or Inf"),
        (lambda d: _tamper_arrays(d, coef=lambda a: a.astype(np.float64)), "float32"),
        (lambda d: _tamper_arrays(d, idf=None), "expected coef, intercept, idf"),
        (lambda d: _tamper_config(d, labels=["normal", "electrical", "mechanical", "hydraulic"]), "labels"),
        (lambda d: _tamper_config(d, labels=TINY_LABELS[:3]), "labels"),
        (lambda d: _tamper_config(d, n_features=SMALL * 2), "coef shape"),
        (lambda d: _tamper_config(d, format_version=2), "format_version"),
        (lambda d: _tamper_config(d, pickle="x"), "unknown fields"),
        (lambda d: _tamper_config(d, word_ngram=[2, 1]), "n-gram range"),
        (lambda d: _tamper_config(d, weight=1.5), "weight"),
    ],
)
def test_bad_files_are_refused_with_a_clear_error(model, tmp_path, tamper, message):
    save_linear(tmp_path, model)
    tamper(tmp_path)
    with pytest.raises(LinearModelError, match=message):
        read_linear(tmp_path, TINY_LABELS)


def test_weight_fit_prefers_the_model_that_is_right():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    good = np.full((200, 4), -5.0)
    good[np.arange(200), y] = 0.0
    bad = rng.normal(size=(200, 4))
    assert fit_weight(bad, good, y) >= 0.5  # the linear model is the one that knows
    assert fit_weight(good, bad, y) <= 0.5
    lp = combine_log_probs(bad, good, 1.0)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-5)
    assert (lp.argmax(1) == y).all()


def test_crossfit_weight_fits_each_half_on_the_other():
    from agent.linear import crossfit_weight

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    good = np.eye(3)[y] * 5.0
    bad = rng.normal(size=(40, 3))
    # The transformer knows the even rows, the linear model the odd ones: each half's weight comes
    # from the other half, so even rows lean linear and odd rows lean transformer.
    t = np.where((np.arange(40) % 2 == 0)[:, None], bad, good)
    lin = np.log(np.clip(np.exp(np.where((np.arange(40) % 2 == 0)[:, None], good, bad)), 1e-6, None))
    w, per_row = crossfit_weight(t, lin - np.log(np.exp(lin).sum(1, keepdims=True)), y)
    assert per_row.shape == (40,) and 0.0 <= w <= 1.0
    assert (per_row[0::2] == per_row[0]).all() and (per_row[1::2] == per_row[1]).all()
    assert per_row[0] <= 0.5 <= per_row[1]  # fitted on the other half's rows
    w_small, per_small = crossfit_weight(t[:3], lin[:3], y[:3])
    assert (per_small == w_small).all()


def test_model_reports_cuts_slices_from_one_pass_and_refuses_a_wrong_layout():
    from agent.learner.round import model_reports

    rows = keyword_samples(60, seed=4)
    model = fit_linear(
        [t for t, _ in rows],
        [lab for _, lab in rows],
        TINY_LABELS,
        LinearConfig(TINY_LABELS, n_features=1 << 12),
    )
    holdout = [(t, lab) for t, lab in keyword_samples(30, seed=5)]
    older, recent = holdout[:20], holdout[20:]
    logits = np.zeros((30, len(TINY_LABELS)), np.float32)  # a transformer that knows nothing
    reports, w = model_reports(logits, {"older": older, "recent": recent, "all": holdout}, model)
    assert {m: set(r) for m, r in reports.items()} == {m: {"older", "recent", "all"} for m in reports}
    assert reports["transformer"]["older"].count == 20
    assert reports["linear"]["recent"].count == 10 and reports["linear"]["all"].count == 30
    assert w > 0.5 and reports["combined"]["all"].accuracy >= reports["transformer"]["all"].accuracy
    fixed, w2 = model_reports(logits, {"older": older, "recent": recent, "all": holdout}, model, 0.0)
    assert w2 == 0.0 and fixed["combined"]["all"].accuracy == fixed["transformer"]["all"].accuracy
    with pytest.raises(ValueError, match="older"):
        model_reports(logits, {"older": recent, "recent": older, "all": holdout}, model)
