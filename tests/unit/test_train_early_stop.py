"""Early stopping on a round's small validation split: ties do not stop training or keep an
earlier epoch (the learning benchmark measured under-fitting when they did)."""

from agent.learner.train import TrainConfig, train_adapter
from tests.tiny import keyword_samples


def test_flat_validation_accuracy_trains_every_epoch(tiny_bundle, tmp_path):
    rows = keyword_samples(32, seed=1)
    val = keyword_samples(8, seed=2)
    # lr 0: the weights never change, so validation accuracy ties at every epoch.
    cfg = TrainConfig(epochs=5, lr=0.0, batch_size=16, patience=2, threads=1)
    res = train_adapter(
        tiny_bundle,
        [t for t, _ in rows],
        [lab for _, lab in rows],
        tmp_path / "a",
        "flat",
        cfg,
        val=([t for t, _ in val], [lab for _, lab in val]),
    )
    assert res.stopped == "epochs"
    assert res.epochs_run == 5
    assert res.steps == 5 * 2
