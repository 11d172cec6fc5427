"""The CRF entity baseline: tokenizer offsets, BIO round trips, F1 in distribution and after drift."""

from __future__ import annotations

import pytest

from tools.bench import crf
from tools.bench.crf import CrfBaseline, bio_to_spans, entity_f1, spans_to_bio, tokenize
from tools.workorders import WorkOrder, workorder_dataset


def words(text: str) -> list[str]:
    return [text[s:e] for s, e in tokenize(text)]


def test_tokenizer_keeps_tags_part_numbers_and_shorthand_whole() -> None:
    text = "repl. DE brg on P-101A, 2,5 kW w/ SKF 6205-2RS (chk'd) ~85°C"
    assert words(text) == [
        "repl", ".", "DE", "brg", "on", "P-101A", ",", "2,5", "kW", "w", "/", "SKF", "6205-2RS",
        "(", "chk'd", ")", "~", "85", "°", "C",
    ]  # fmt: skip
    assert all(text[s:e] == w for (s, e), w in zip(tokenize(text), words(text), strict=True))
    assert tokenize("") == [] and tokenize("   ") == []


def test_spans_survive_bio_and_back_on_simulated_work_orders() -> None:
    for wo in workorder_dataset(2000, seed=6, drift=True):
        tokens = tokenize(wo.text)
        assert bio_to_spans(tokens, spans_to_bio(tokens, wo.entities)) == list(wo.entities), wo


def test_bio_decoding_starts_a_span_on_a_stray_inside_tag() -> None:
    tokens = [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert bio_to_spans(tokens, ["I-A", "I-A", "I-B", "O"]) == [(0, 3, "A"), (4, 5, "B")]
    assert bio_to_spans(tokens, ["B-A", "B-A", "O", "I-A"]) == [(0, 1, "A"), (2, 3, "A"), (6, 7, "A")]


def test_word_features_see_shape_and_neighbours() -> None:
    features = crf.word_features(["repl", "brg", "P-101", "today"], 2)
    assert features["shape"] == "X-dd" and features["hashyphen"] and features["hasdigit"]
    assert (
        features["-1:lower"] == "brg" and features["-2:lower"] == "repl" and features["+1:lower"] == "today"
    )
    assert features["+2:edge"] and "+2:lower" not in features


@pytest.fixture(scope="module")
def trained() -> tuple[CrfBaseline, list[WorkOrder], list[WorkOrder]]:
    """A CRF on the first 900 pre-drift work orders; the rest of pre-drift and 500 drifted to score."""
    data = workorder_dataset(2800, seed=21, drift=True)
    pre = [w for w in data if not w.drifted]
    post = [w for w in data if w.drifted][:500]
    model = CrfBaseline().fit((w.text, w.entities) for w in pre[:900])
    return model, pre[900:], post


def f1(model: CrfBaseline, records: list[WorkOrder]) -> float:
    return entity_f1([w.entities for w in records], model.predict(w.text for w in records))


def test_crf_learns_in_distribution_entities(trained) -> None:
    model, pre_test, _ = trained
    assert f1(model, pre_test) > 0.9


def test_crf_trained_before_drift_loses_f1_after_it(trained) -> None:
    model, pre_test, post_test = trained
    before, after = f1(model, pre_test), f1(model, post_test)
    assert after < before - 0.1, (before, after)


def test_predict_returns_char_spans_and_handles_empty_texts(trained) -> None:
    model, pre_test, _ = trained
    predicted = model.predict(["", pre_test[0].text, "   "])
    assert predicted[0] == [] and predicted[2] == []
    text = pre_test[0].text
    assert all(text[s:e] == text[s:e].strip() and s < e for s, e, _ in predicted[1])


def test_fit_and_predict_refuse_what_they_cannot_do() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        CrfBaseline().predict(["pump P-1 leaking"])
    with pytest.raises(ValueError, match="no non-empty"):
        CrfBaseline().fit([("", [])])


def test_bench_cli_prints_both_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert crf.main(["--n", "400", "--max-iterations", "20", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "F1 pre-drift test" in out[0]
    result = __import__("json").loads(out[-1])
    assert 0.0 <= result["f1_post_drift"] <= 1.0 and result["n_train"] == 140
