"""One training round: LoRA + head on labeled texts, on the bundle's fp32 base (torch + peft)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import load_manifest
from agent.learner.model import new_peft_model, save_peft_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    # Measured on maintenance texts: LoRA on MiniLM needs lr ~1e-3 and ~8 epochs to match a full
    # fine-tune; 3 epochs under-fit badly.
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None
    time_budget_s: float | None = None


@dataclass(frozen=True)
class TrainResult:
    version: str
    steps: int
    seconds: float
    final_loss: float


def train_adapter(
    bundle_dir: Path,
    texts: list[str],
    labels: list[str],
    out_dir: Path,
    version: str,
    config: TrainConfig | None = None,
    init_adapter: Path | None = None,
    parent: str | None = None,
) -> TrainResult:
    """Train LoRA + head on (texts, labels) and write a PEFT adapter directory with our manifest."""
    import torch
    from transformers import AutoTokenizer

    config = config or TrainConfig()
    manifest = load_manifest(bundle_dir)
    index = {lab: i for i, lab in enumerate(manifest.labels)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels not in the bundle's label set: {unknown}")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(Path(bundle_dir) / "tokenizer")
    model = new_peft_model(bundle_dir, manifest, init_adapter)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr)
    y_all = np.array([index[lab] for lab in labels])
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    steps, loss_value = 0, float("nan")
    for _epoch in range(config.epochs):
        order = rng.permutation(len(texts))
        for b in range(0, len(order), config.batch_size):
            idx = order[b : b + config.batch_size]
            # Pad to the batch, not to max_length: plant texts are short.
            enc = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=manifest.max_length, return_tensors="pt"
            )
            out = model(**enc, labels=torch.as_tensor(y_all[idx]))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            steps += 1
            loss_value = float(out.loss.detach())
            if config.time_budget_s and time.perf_counter() - start > config.time_budget_s:
                break
        else:
            continue
        break
    model.eval()
    seconds = time.perf_counter() - start
    save_peft_adapter(
        model, out_dir, manifest, version, parent=parent, num_examples=len(texts), metrics={"train_loss": loss_value}
    )
    log.info("adapter %s trained: %d steps in %.1fs, loss %.4f", version, steps, seconds, loss_value)
    return TrainResult(version, steps, seconds, loss_value)
