"""A round that continues the last adapter writes the same artifact: ``adapter_config.json`` must
not grow. ``PeftModel.from_pretrained`` appends the SEQ_CLS head names to the ``modules_to_save``
it loaded, and every saved round repeated them (4 entries after the first round, 14 after the
sixth)."""

import json

from agent.learner.train import TrainConfig, train_adapter
from tests.tiny import keyword_samples


def test_modules_to_save_and_sizes_stay_the_same_round_after_round(tiny_bundle, tmp_path):
    rows = keyword_samples(16, seed=3)
    texts, labels = [t for t, _ in rows], [lab for _, lab in rows]
    seen = []
    parent = None
    for r in range(6):
        out = tmp_path / f"r{r}"
        train_adapter(
            tiny_bundle, texts, labels, out, out.name, TrainConfig(epochs=1, threads=1), init_adapter=parent
        )
        cfg = json.loads((out / "adapter_config.json").read_text())
        seen.append(
            (
                cfg["modules_to_save"],
                (out / "adapter_config.json").stat().st_size,
                (out / "adapter_model.safetensors").stat().st_size,
            )
        )
        parent = out
    modules = seen[0][0]
    assert modules and len(modules) == len(set(modules))
    assert all(s == seen[0] for s in seen), seen
