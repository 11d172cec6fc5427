"""A fleet adapter (an evaluation-only round) is judged with the box's fast learner beside it."""

from __future__ import annotations

import shutil

from agent.learner.round import RoundSpec, run_round
from agent.linear import read_linear
from agent.store import NewSample, Store
from tests.tiny import TINY_LABELS, keyword_samples


def test_an_evaluation_only_round_refits_and_saves_the_fast_learner(tiny_bundle, random_adapter, tmp_path):
    store = Store(tmp_path / "db.sqlite").open()
    rows = keyword_samples(200, seed=1)
    store.write([NewSample(key=f"k{i}", text=t, label=lab) for i, (t, lab) in enumerate(rows)], 0.2)
    store.close()
    out = tmp_path / "candidate"
    shutil.copytree(random_adapter, out)
    spec = RoundSpec(
        db_path=str(tmp_path / "db.sqlite"),
        bundle_dir=str(tiny_bundle),
        out_dir=str(out),
        result_path=str(tmp_path / "result.json"),
        version="fleet-1",
        evaluate_only=True,
        linear_n_features=1 << 12,
    )
    result = run_round(spec)
    assert result.status == "trained"
    assert set(result.candidate_models) == {"transformer", "linear", "combined"}
    assert result.candidate == result.candidate_models["transformer"]
    # The random adapter knows nothing; the keyword model does.
    linear_acc = result.candidate_models["linear"]["all"]["accuracy"]
    assert linear_acc > 0.9 > result.candidate_models["transformer"]["all"]["accuracy"]
    model = read_linear(out, TINY_LABELS)
    assert model is not None and model.config.version == "fleet-1" and result.linear["samples"] > 0
