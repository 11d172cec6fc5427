"""The learning benchmark's pure parts: data protocol, replay, holdout halves, prequential bookkeeping,
samples-to-recover, targets and the JSON contract. No training, no engine."""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import pytest

from tools.bench import common, learning
from tools.bench.learning import Row


def rows(labels: str) -> list[Row]:
    return [Row(f"t{i} {lab}", lab) for i, lab in enumerate(labels)]


def test_holdout_splitter_matches_the_store_rule():
    s = learning.HoldoutSplitter(0.1)
    flags = [s.is_holdout("a") for _ in range(30)]
    # floor(n * 0.1 + 0.5): the 5th, 15th, 25th sample of a label go to the holdout.
    assert [i + 1 for i, f in enumerate(flags) if f] == [5, 15, 25]
    # Labels are counted separately.
    assert [s.is_holdout("b") for _ in range(5)] == [False, False, False, False, True]


def test_training_set_replays_class_balanced_older_rows():
    new = rows("x" * 40)
    older = rows("a" * 100 + "b" * 3 + "c" * 50)
    texts, labels, n_new, n_replay = learning.training_set(new, older, ["a", "b", "c", "d"], 0.5, seed=1)
    assert n_new == 40
    counts = Counter(labels)
    # n_replay = 40 * 0.5 / 0.5 = 40 -> 10 per label; "b" has only 3, "d" none.
    assert counts == {"x": 40, "a": 10, "b": 3, "c": 10}
    assert n_replay == 23 and len(texts) == 63
    assert set(texts) >= {r.text for r in new}
    # Deterministic for a seed, different for another.
    assert learning.training_set(new, older, ["a", "b", "c", "d"], 0.5, seed=1)[0] == texts
    assert learning.training_set(new, older, ["a", "b", "c", "d"], 0.5, seed=2)[0] != texts


def test_training_set_without_replay_or_older_rows():
    new = rows("xy" * 5)
    assert learning.training_set(new, rows("aaa"), ["a"], 0.0, seed=0)[2:] == (10, 0)
    assert learning.training_set(new, [], ["a"], 0.5, seed=0)[2:] == (10, 0)


def test_holdout_slices_recent_is_the_new_rows():
    older, recent = learning.holdout_slices(rows("abcde"), rows("fg"))
    assert [r.label for r in older] == list("abcde") and [r.label for r in recent] == list("fg")
    older, recent = learning.holdout_slices(rows("abcde"), rows("fg"), limit=3)
    assert [r.label for r in older] == list("cde")
    # No new rows (first round): the newest quarter stands in for recent.
    older, recent = learning.holdout_slices(rows("abcdefgh"), [])
    assert [r.label for r in older] == list("abcdef") and [r.label for r in recent] == list("gh")


def test_prequential_bookkeeping():
    correct = [(50, 100), (80, 100), (45, 50), (0, 0)]
    acc = learning.chunk_accuracies(correct)
    assert acc[:3] == [0.5, 0.8, 0.9] and math.isnan(acc[3])
    assert learning.pooled_accuracy(correct) == pytest.approx(175 / 250)
    assert learning.pooled_accuracy(correct, skip_first=1) == pytest.approx(125 / 150)
    assert math.isnan(learning.pooled_accuracy([], 0))


def test_samples_to_recover():
    sizes = [200, 200, 200, 200]
    # Chunk k is predicted after learning from chunks 0..k-1.
    assert learning.samples_to_recover([0.7, 0.85, 0.93, 0.95], sizes, 0.93) == 400
    assert learning.samples_to_recover([0.95, 0.7, 0.9, 0.9], sizes, 0.93) == 0
    assert learning.samples_to_recover([0.7, 0.8, 0.9, 0.92], sizes, 0.93) is None
    assert learning.samples_to_recover([0.7, math.nan, 0.94], [100, 50, 70], 0.93) == 150
    with pytest.raises(ValueError):
        learning.samples_to_recover([0.9], sizes, 0.9)


def test_points():
    assert learning.points(0.95, 0.94) == pytest.approx(1.0)
    assert math.isnan(learning.points(math.nan, 0.9))


def test_split_records_cuts_the_protocol_parts():
    data = [Row(f"text {i}", "ab"[i % 2]) for i in range(1000)]
    s = learning.split_records(data, pre_fraction=0.5, n_chunks=4)
    sizes = s.sizes()
    assert sizes["pre_test"] == 75 and sizes["post_test"] == 100
    assert sizes["pre_train"] + sizes["pre_holdout"] == 425
    assert sizes["chunks"] == [100, 100, 100, 100]
    # Time order is kept: pre-drift rows come first, the post-drift test last.
    assert s.pre_test[-1].text == "text 499" and s.post_test[0].text == "text 900"
    assert s.chunks[0][0].text == "text 500"
    # ~10 % holdout everywhere, and the holdout never overlaps training.
    assert 0.08 <= sizes["pre_holdout"] / 425 <= 0.12
    assert sum(sizes["chunk_holdout"]) == pytest.approx(40, abs=4)
    train, hold = {r.text for r in s.all_train()}, {r.text for r in s.all_holdout()}
    assert not train & hold and len(train) + len(hold) == 825
    assert s.labels() == ["a", "b"]
    with pytest.raises(ValueError):
        learning.split_records(data[:10], n_chunks=6)


def test_simulated_split_drifts_after_the_pre_drift_part():
    plan = learning.Plan.quick()
    s = learning.simulated_split(plan, seed=0)
    sizes = s.sizes()
    assert sizes["pre_train"] + sizes["pre_holdout"] == plan.n_pre_stored
    assert sizes["chunks"] == [plan.chunk_size] * plan.n_chunks
    assert sizes["post_test"] == plan.n_post_test and sizes["pre_test"] == plan.n_pre_test
    assert s.drift_known
    from tools.simulate import LABELS

    assert set(s.labels()) <= set(LABELS)


def fake_result() -> dict:
    r = {k: 0.9 for k in learning.REQUIRED_KEYS}
    r.update(
        recovery_ratio=0.97,
        acc_drift_online_minus_tfidf=-0.01,
        forgetting_pts=1.5,
        infer_p99_ratio_training=math.nan,
        learner_peak_rss_mb=900.0,
        samples_to_recover=None,
        ablations={"full": {"acc_drift_online": 0.9, "forgetting_pts": 1.5}},
    )
    return r


def test_targets_and_required_keys_on_a_fake_result():
    r = fake_result()
    assert learning.missing_keys(r) == []
    assert learning.missing_keys({"acc_before_drift": 1.0})[0] == "acc_drift_no_learning"
    t = learning.targets(r)
    assert set(t) == set(learning.TARGETS)
    assert t["recovery_ratio"]["met"] is True
    assert t["acc_drift_online_minus_tfidf"]["met"] is False
    assert t["forgetting_pts"]["met"] is True
    assert t["infer_p99_ratio_training"]["met"] is None  # NaN: not measured
    assert t["learner_peak_rss_mb"]["met"] is True
    # The last line is strict JSON with every required key (NaN -> null).
    out = io.StringIO()
    common.print_json_line({**r, "targets": t}, out)
    back = json.loads(out.getvalue().splitlines()[-1])
    assert set(learning.REQUIRED_KEYS) <= set(back)
    assert back["infer_p99_ratio_training"] is None and back["samples_to_recover"] is None


def test_parser_defaults():
    args = learning._parser().parse_args([])
    assert args.dataset is None and not args.quick and not args.json
    args = learning._parser().parse_args(
        ["--dataset", "x.csv", "--text-col", "t", "--label-col", "l", "--quick", "--json"]
    )
    assert args.dataset.name == "x.csv" and args.text_col == "t" and args.quick and args.json
