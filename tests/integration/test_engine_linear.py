"""The engine serves the fast learner from the adapter's directory: transformer, linear or combined,
each answer naming its model; a bad linear model is refused and what serves stays."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from agent.adapters import AdapterError
from agent.engine import EngineConfig, InferenceEngine
from agent.linear import LinearConfig, combine_log_probs, fit_linear, save_linear, write_serving
from tests.tiny import TINY_LABELS, keyword_samples

TEXTS = [t for t, _ in keyword_samples(24, seed=7)]


@pytest.fixture(scope="module")
def linear():
    rows = keyword_samples(120, seed=1)
    return fit_linear(
        [t for t, _ in rows],
        [lab for _, lab in rows],
        TINY_LABELS,
        LinearConfig(TINY_LABELS, n_features=1 << 12, weight=0.3),
    )


def _unit(random_adapter, linear, tmp_path, model):
    d = tmp_path / f"unit-{model}"
    shutil.copytree(random_adapter, d)
    save_linear(d, linear)
    write_serving(d, model)
    return d


def test_each_model_answers_as_chosen_and_names_itself(tiny_bundle, random_adapter, linear, tmp_path):
    cfg = EngineConfig(precision="fp32", cache_size=0, merge_adapters=False)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=random_adapter) as engine:
        transformer = engine.transformer_logits(TEXTS)
        preds = engine.predict(TEXTS)
        assert {p.model for p in preds} == {"transformer"} and engine.serving_model == "transformer"
        assert [p.label for p in preds] == [TINY_LABELS[i] for i in transformer.argmax(1)]

        engine.activate_adapter(_unit(random_adapter, linear, tmp_path, "linear"))
        preds = engine.predict(TEXTS)
        assert {p.model for p in preds} == {"linear"} and engine.stats()["serving_model"] == "linear"
        assert [p.label for p in preds] == linear.predict(TEXTS)

        engine.activate_adapter(_unit(random_adapter, linear, tmp_path, "combined"))
        preds = engine.predict(TEXTS)
        assert {p.model for p in preds} == {"combined"}
        lp = combine_log_probs(transformer, linear.log_proba(TEXTS), 0.3)
        assert [p.label for p in preds] == [TINY_LABELS[i] for i in lp.argmax(1)]
        np.testing.assert_allclose([p.score for p in preds], np.exp(lp.max(1)), atol=1e-5)

        # A directory with a linear model that the gate left on the transformer serves the transformer.
        engine.activate_adapter(_unit(random_adapter, linear, tmp_path, "transformer"))
        assert {p.model for p in engine.predict(TEXTS)} == {"transformer"}
        assert engine.linear_model is not None


def test_a_bad_linear_model_is_refused_and_what_serves_stays(tiny_bundle, random_adapter, linear, tmp_path):
    good = _unit(random_adapter, linear, tmp_path, "combined")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "linear_model.safetensors").unlink()
    orphan = tmp_path / "orphan"  # serving.json names the linear model, none is there
    shutil.copytree(random_adapter, orphan)
    write_serving(orphan, "linear")
    cfg = EngineConfig(precision="fp32", cache_size=0, merge_adapters=False)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=good) as engine:
        assert engine.serving_model == "combined"
        with pytest.raises(AdapterError, match="linear_model.safetensors is missing"):
            engine.activate_adapter(bad)
        with pytest.raises(AdapterError, match="carries no linear model"):
            engine.activate_adapter(orphan)
        assert engine.serving_model == "combined"
        assert {p.model for p in engine.predict(TEXTS)} == {"combined"}
        # Rolling back to the plain adapter directory takes the linear model away with it.
        engine.activate_adapter(random_adapter)
        assert engine.serving_model == "transformer" and engine.linear_model is None


def test_combined_answers_survive_the_merge(tiny_bundle, random_adapter, linear, tmp_path):
    cfg = EngineConfig(precision="fp32", cache_size=0, merge_delay_s=0.0)
    with InferenceEngine.open(tiny_bundle, cfg) as engine:
        engine.activate_adapter(_unit(random_adapter, linear, tmp_path, "combined"))
        engine.wait_merged()
        assert engine.serving_path == "merged"
        assert {p.model for p in engine.predict(TEXTS)} == {"combined"}


def test_a_new_fast_learner_on_the_same_weights_keeps_the_merged_session(
    tiny_bundle, random_adapter, linear, tmp_path
):
    """A fast-learner refresh (same LoRA weights, new linear model and version) swaps at once: no
    second merged session is built, the answers come from the new linear model and version."""
    from agent.adapters import read_meta, write_meta

    cfg = EngineConfig(precision="fp32", cache_size=64, merge_delay_s=0.0)
    rows = keyword_samples(200, seed=3)
    refit = fit_linear(
        [t for t, _ in rows],
        [lab for _, lab in rows],
        TINY_LABELS,
        LinearConfig(TINY_LABELS, n_features=1 << 12),
    )
    with InferenceEngine.open(tiny_bundle, cfg) as engine:
        engine.activate_adapter(_unit(random_adapter, linear, tmp_path, "combined"))
        engine.wait_merged()
        before = engine.stats()["merge"]
        first = engine.adapter_version
        engine.predict(TEXTS)  # cached under the first version

        refreshed = tmp_path / "refreshed"
        shutil.copytree(tmp_path / "unit-combined", refreshed)
        save_linear(refreshed, refit)
        write_serving(refreshed, "linear")
        meta = read_meta(refreshed)
        meta.version, meta.parent = f"{meta.version}-f1", meta.version
        write_meta(refreshed, meta)
        engine.activate_adapter(refreshed)
        assert engine.adapter_version == f"{first}-f1" and engine.serving_path == "merged"
        assert engine.stats()["merge"]["switched"] == before["switched"]  # no new build
        preds = engine.predict(TEXTS)
        assert {p.model for p in preds} == {"linear"} and {p.adapter_version for p in preds} == {
            f"{first}-f1"
        }
        assert [p.label for p in preds] == refit.predict(TEXTS)

        # Other LoRA weights take the full path again: a new merged session.
        other = tmp_path / "other"
        shutil.copytree(refreshed, other)
        from safetensors.numpy import load_file, save_file

        w = load_file(str(other / "adapter_model.safetensors"))
        save_file({k: v * 1.5 for k, v in w.items()}, str(other / "adapter_model.safetensors"))
        engine.activate_adapter(other)
        engine.wait_merged()
        assert engine.stats()["merge"]["switched"] == before["switched"] + 1
