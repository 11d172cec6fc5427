"""``TrainConfig.max_steps``: training stops after that many optimizer steps, whatever the epochs,
so a small site gets the same number of updates as a large one (the fleet benchmark's budget)."""

import numpy as np
from safetensors.numpy import load_file

from agent.learner.train import TrainConfig, train_adapter
from tests.tiny import keyword_samples


def _train(bundle, rows, out, **cfg):
    return train_adapter(
        bundle,
        [t for t, _ in rows],
        [lab for _, lab in rows],
        out,
        out.name,
        TrainConfig(batch_size=16, threads=1, **cfg),
    )


def test_max_steps_stops_mid_epoch_and_across_epochs(tiny_bundle, tmp_path):
    rows = keyword_samples(40, seed=1)  # 3 batches an epoch
    res = _train(tiny_bundle, rows, tmp_path / "a", epochs=10, max_steps=7)
    assert (res.steps, res.epochs_run, res.stopped) == (7, 3, "max_steps")
    # An exact epoch boundary does not start (and count) another epoch.
    res = _train(tiny_bundle, rows, tmp_path / "b", epochs=10, max_steps=6)
    assert (res.steps, res.epochs_run, res.stopped) == (6, 2, "max_steps")
    # Epochs run out first: the cap does not apply.
    res = _train(tiny_bundle, rows, tmp_path / "c", epochs=1, max_steps=7)
    assert (res.steps, res.stopped) == (3, "epochs")


def test_max_steps_zero_writes_the_untrained_start_adapter(tiny_bundle, tmp_path):
    rows = keyword_samples(20, seed=1)
    res = _train(tiny_bundle, rows, tmp_path / "z", epochs=3, max_steps=0, lr=1e-2)
    assert (res.steps, res.stopped) == (0, "max_steps")
    tensors = load_file(str(tmp_path / "z" / "adapter_model.safetensors"))
    b_keys = [k for k in tensors if k.endswith(".lora_B.weight")]
    assert b_keys and all(not np.any(tensors[k]) for k in b_keys)  # PEFT starts B at zero
