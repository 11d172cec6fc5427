"""FFA-LoRA on the box: with the fleet's seed every A is the fleet's frozen matrix and only B and the
head learn; an adapter trained with its own A restarts LoRA under the fleet's A and keeps its head."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from agent.fed.lora_tensors import frozen_lora_a
from agent.learner.train import TrainConfig, train_adapter
from tests.tiny import keyword_samples

SEED = 11


def _train(bundle, out, init=None, seed=SEED, lr=5e-3):
    data = keyword_samples(120, seed=3)
    train_adapter(
        bundle,
        [t for t, _ in data],
        [lab for _, lab in data],
        out,
        out.name,
        TrainConfig(epochs=2, lr=lr),
        init_adapter=init,
        frozen_a_seed=seed,
    )
    return load_file(str(out / "adapter_model.safetensors"))


def _a_keys(tensors):
    return sorted(k for k in tensors if k.endswith(".lora_A.weight"))


def test_ffa_training_freezes_a_and_continues_from_a_fleet_adapter(tiny_bundle, tmp_path):
    first = _train(tiny_bundle, tmp_path / "ffa1")
    assert _a_keys(first)
    for k in _a_keys(first):
        assert np.array_equal(first[k], frozen_lora_a(SEED, k, *first[k].shape)), k
    assert any(np.abs(first[k]).max() > 0 for k in first if k.endswith(".lora_B.weight"))
    second = _train(tiny_bundle, tmp_path / "ffa2", init=tmp_path / "ffa1")
    for k in _a_keys(second):
        assert np.array_equal(second[k], first[k])
    # It continued: B moved on from where the first round left it, not from zero.
    b = next(k for k in second if k.endswith(".lora_B.weight"))
    assert not np.array_equal(second[b], first[b])


def test_an_adapter_with_its_own_a_restarts_lora_under_the_fleet_a(tiny_bundle, tmp_path):
    data = keyword_samples(120, seed=4)
    own = tmp_path / "own"
    train_adapter(
        tiny_bundle, [t for t, _ in data], [lab for _, lab in data], own, "own", TrainConfig(epochs=1)
    )
    own_t = load_file(str(own / "adapter_model.safetensors"))
    after = _train(tiny_bundle, tmp_path / "joined", init=own, lr=0.0)  # lr 0: what it started from
    for k in _a_keys(after):
        assert np.array_equal(after[k], frozen_lora_a(SEED, k, *after[k].shape))
        assert not np.array_equal(after[k], own_t[k])
    assert all(not np.abs(after[k]).any() for k in after if k.endswith(".lora_B.weight"))  # LoRA afresh
    for k in ("base_model.model.classifier.weight", "base_model.model.classifier.bias"):
        assert np.array_equal(after[k], own_t[k])  # the head it had learned
