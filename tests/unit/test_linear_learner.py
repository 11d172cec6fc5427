"""The fast learner refit from SQLite on a tiny stream: newest samples, known labels, the round's
validation rows left out, seconds."""

import time

from agent.learner.round import fit_linear_from_db, read_linear_training_set
from agent.store import NewSample, Store
from tests.tiny import TINY_LABELS, keyword_samples


def _store(path, rows):
    store = Store(path).open()
    store.write(
        [NewSample(key=f"k{i}", text=t, label=lab) for i, (t, lab) in enumerate(rows)], holdout_fraction=0.2
    )
    return store


def test_refit_from_sqlite_on_a_tiny_stream(tmp_path):
    rows = keyword_samples(150, seed=1)
    store = _store(tmp_path / "db.sqlite", rows)
    try:
        texts, labels = read_linear_training_set(str(store.path), TINY_LABELS, limit=10_000)
        n_holdout = store.db.conn.execute("SELECT COUNT(*) FROM samples WHERE split='holdout'").fetchone()[0]
        assert n_holdout > 0 and len(texts) == len(rows) - n_holdout  # train split only
        newest, _ = read_linear_training_set(str(store.path), TINY_LABELS, limit=10)
        assert newest == texts[-10:]
        held = set(texts[:5])
        kept, _ = read_linear_training_set(str(store.path), TINY_LABELS, limit=10_000, exclude=held)
        assert not held & set(kept)

        t0 = time.perf_counter()
        model, info = fit_linear_from_db(str(store.path), TINY_LABELS, 10_000, n_features=1 << 12)
        assert model is not None and time.perf_counter() - t0 < 30
        assert info["samples"] == len(texts)
        test = keyword_samples(60, seed=9)
        acc = sum(p == lab for p, (_, lab) in zip(model.predict([t for t, _ in test]), test, strict=True))
        assert acc / len(test) > 0.9
    finally:
        store.close()


def test_one_class_is_no_model(tmp_path):
    rows = [(t, "normal") for t, _ in keyword_samples(30, seed=2)]
    store = _store(tmp_path / "db.sqlite", rows)
    try:
        model, info = fit_linear_from_db(str(store.path), TINY_LABELS, 10_000, n_features=1 << 12)
        assert model is None and "two classes" in info["skipped"]
    finally:
        store.close()
