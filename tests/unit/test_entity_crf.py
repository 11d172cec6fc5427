"""The fast entity learner: the baseline's CRF through python-crfsuite directly, its files checked
before crfsuite's C parser sees them."""

from __future__ import annotations

import json

import pytest

from agent.entity_crf import CRF_CONFIG, CRF_MODEL, CrfError, fit_crf, read_crf, save_crf
from tools.bench.crf import CrfBaseline, entity_f1
from tools.workorders import ENTITY_LABELS, workorder_dataset

ORDERS = workorder_dataset(500, seed=4)
TRAIN, TEST = ORDERS[:400], ORDERS[400:]


@pytest.fixture(scope="module")
def crf():
    return fit_crf([wo.text for wo in TRAIN], [wo.entities for wo in TRAIN], ENTITY_LABELS)


def test_same_model_as_the_sklearn_crfsuite_baseline(crf):
    baseline = CrfBaseline().fit((wo.text, wo.entities) for wo in TRAIN)
    texts = [wo.text for wo in TEST]
    assert crf.predict_tuples(texts) == baseline.predict(texts)
    assert entity_f1([list(wo.entities) for wo in TEST], crf.predict_tuples(texts)) > 0.9


def test_spans_slice_the_text_and_carry_a_probability(crf):
    for wo, spans in zip(TEST[:30], crf.predict(wo.text for wo in TEST[:30]), strict=True):
        for s in spans:
            assert wo.text[s.start : s.end] == s.text and s.label in ENTITY_LABELS
            assert 0.0 < s.score <= 1.0
    assert crf.predict(["", "   "]) == [(), ()]


def test_saved_and_read_back(crf, tmp_path):
    save_crf(tmp_path, crf)
    again = read_crf(tmp_path, ENTITY_LABELS)
    texts = [wo.text for wo in TEST[:20]]
    assert again is not None and again.predict(texts) == crf.predict(texts)
    assert read_crf(tmp_path / "elsewhere", ENTITY_LABELS) is None


def test_an_altered_model_file_is_refused_without_being_opened(crf, tmp_path):
    save_crf(tmp_path, crf)
    # crfsuite's parser segfaults on a file with its magic and garbage after it: never reached.
    (tmp_path / CRF_MODEL).write_bytes(b"lCRF" + b"\xff" * 200)
    with pytest.raises(CrfError, match="SHA-256"):
        read_crf(tmp_path, ENTITY_LABELS)


def test_a_config_with_foreign_labels_or_bad_json_is_refused(crf, tmp_path):
    save_crf(tmp_path, crf)
    config = json.loads((tmp_path / CRF_CONFIG).read_text())
    (tmp_path / CRF_CONFIG).write_text(json.dumps({**config, "labels": ["ASSET", "WIDGET"]}))
    with pytest.raises(CrfError, match="WIDGET"):
        read_crf(tmp_path, ENTITY_LABELS)
    (tmp_path / CRF_CONFIG).write_text("{not json")
    with pytest.raises(CrfError, match="not readable"):
        read_crf(tmp_path, ENTITY_LABELS)
    (tmp_path / CRF_CONFIG).unlink()
    with pytest.raises(CrfError, match="not readable"):
        read_crf(tmp_path, ENTITY_LABELS)


def test_the_combination_follows_each_model_at_its_end_of_the_weight(crf):
    import numpy as np

    from agent.entities import TagScheme
    from agent.entity_crf import tokenize

    scheme = TagScheme(ENTITY_LABELS, "BILOU")
    texts = [wo.text for wo in TEST[:40]]
    same = 0
    for text, want in zip(texts, crf.predict_tuples(texts), strict=True):
        offsets = tokenize(text)  # a "transformer" token per CRF word, sure that nothing is an entity
        nothing = np.zeros((len(offsets), len(scheme.tags)))
        nothing[:, 0] = 1.0
        assert crf.combine(text, offsets, nothing, scheme, weight=1.0) == ()
        got = [(s.start, s.end, s.label) for s in crf.combine(text, offsets, nothing, scheme, weight=0.0)]
        same += got == want  # marginals' argmax per word vs Viterbi: nearly always the same
        # The transformer's BILOU tags fold into the CRF's BIO: U- and L- of a one-word span.
        if want:
            start, end, label = want[0]
            word = next(i for i, (s, _) in enumerate(offsets) if s == start)
            sure = nothing.copy()
            sure[word] = 0.0
            sure[word, scheme.tag_id("U", label)] = 1.0
            spans = crf.combine(text, offsets, sure, scheme, weight=1.0)
            assert spans[0].label == label and spans[0].start == start
    assert same >= 38
