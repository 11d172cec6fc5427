"""One training round: LoRA + head on labeled texts, on the bundle's fp32 base (torch + peft).

The bundle's task decides what a target is: a label per text (sequence classification), or the
text's entity spans (token classification), which become one tag per token of each serving window
(``agent.entities.token_labels``: the first piece of a word carries the tag, every other token
-100). Everything below the examples (loss, replay, the lambda pull, distillation, early stopping)
is the same for both.

Against forgetting: the caller mixes a class-balanced replay of older samples into ``texts``,
and the loss adds ``anchor_lambda * ||theta - theta*||^2`` where theta* are the trainable tensors of
an anchor adapter (the fleet's global adapter, else the active one). Optionally the loss also
distils the anchor model's predictions (KL at temperature T) on the rows where the anchor is
right: old behaviour is kept where it was correct, and drifted rows it gets wrong are left to the
cross-entropy. Early stopping keeps the epoch with the best validation accuracy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import BundleManifest, load_manifest
from agent.entities import IGNORE, SpanTuple
from agent.learner.model import new_peft_model, save_peft_adapter

log = logging.getLogger(__name__)


# What a text is trained toward: its label, or its entity spans (token classification).
Target = str | Sequence[SpanTuple]


class TrainingCancelled(Exception):
    """The round was cancelled between steps; nothing was written."""


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
    anchor_lambda: float = 0.0
    distill_weight: float = 0.0  # weight of the KL term toward the anchor model's predictions
    distill_temperature: float = 2.0
    patience: int = 2  # epochs without validation gain before stopping
    # Stop after this many optimizer steps (None: no cap). A budget in steps, not epochs, gives a
    # small site as many updates as a large one (the fleet benchmark); 0 writes the start adapter.
    max_steps: int | None = None


@dataclass(frozen=True)
class TrainResult:
    version: str
    steps: int
    epochs_run: int
    seconds: float
    final_loss: float
    best_val_accuracy: float | None
    stopped: str  # "epochs" | "early_stop" | "time_budget" | "max_steps"


def train_adapter(
    bundle_dir: Path,
    texts: list[str],
    labels: Sequence[Target],
    out_dir: Path,
    version: str,
    config: TrainConfig | None = None,
    init_adapter: Path | None = None,
    parent: str | None = None,
    anchor_adapter: Path | None = None,
    val: tuple[list[str], Sequence[Target]] | None = None,
    should_stop: Callable[[], bool] | None = None,
    wait_if_paused: Callable[[], None] | None = None,
    frozen_a_seed: int | None = None,
) -> TrainResult:
    """Train LoRA + head on (texts, labels) and write a PEFT adapter directory with our manifest.

    ``labels``: one label per text, or for a token-classification bundle one list of
    ``(start, end, label)`` character spans per text (``agent.entities.validate_spans`` order).

    With ``frozen_a_seed`` (a fleet aggregating with FFA-LoRA) every ``lora_A`` is the fleet's
    frozen matrix for that seed and is not trained: only B and the head learn, so the fleet's
    average of B is exact. An ``init_adapter`` trained with other A factors cannot continue under
    that A (B·A would change meaning): training then starts LoRA afresh and keeps its head.
    """
    import torch

    config = config or TrainConfig()
    manifest = load_manifest(bundle_dir)
    if not texts:
        raise ValueError("no training texts")
    examples = _examples(bundle_dir, manifest, texts, labels)
    val_examples = _examples(bundle_dir, manifest, *val) if val is not None and val[0] else None
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    head_from = None
    if (
        frozen_a_seed is not None
        and init_adapter is not None
        and not _has_frozen_a(init_adapter, frozen_a_seed)
    ):
        log.info(
            "%s was not trained with the fleet's frozen A: LoRA starts afresh, the head is kept", init_adapter
        )
        init_adapter, head_from = None, init_adapter
    model = new_peft_model(bundle_dir, manifest, init_adapter)
    if head_from is not None:
        _load_head(model, head_from)
    if frozen_a_seed is not None:
        _freeze_lora_a(model, frozen_a_seed)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # A frozen anchor model only where something reads it: distillation, or theta* of a given
    # adapter. Without an adapter theta* is the starting point, read off the model itself.
    # Distillation keeps what an earlier adapter learned. A first round starts from the base's
    # untrained head: there is nothing to keep, and distilling toward it held the NER benchmark's
    # first adapter at entity F1 0.890 instead of 0.961 (tools/bench/ner_learning.py, same data).
    distill = config.distill_weight > 0 and (
        init_adapter is not None or anchor_adapter is not None or head_from is not None
    )
    anchor_model = None
    if distill or (config.anchor_lambda > 0 and anchor_adapter is not None):
        anchor_model = _anchor_model(bundle_dir, manifest, anchor_adapter, model)
    anchor = _anchor_tensors(anchor_model or model, trainable) if config.anchor_lambda > 0 else {}
    teacher = anchor_model if distill else None
    opt = torch.optim.AdamW(list(trainable.values()), lr=config.lr)
    rng = np.random.default_rng(config.seed)

    def val_accuracy() -> float:
        """Share of labeled targets predicted right: texts, or tagged word-first pieces."""
        assert val_examples is not None
        model.eval()
        ok = total = 0
        with torch.no_grad():
            for b in range(0, len(val_examples), 64):
                batch, y = val_examples.batch(np.arange(b, min(b + 64, len(val_examples))))
                pred = model(**batch).logits.argmax(-1)
                counted = y != IGNORE
                ok += int(((pred == y) & counted).sum())
                total += int(counted.sum())
        model.train()
        return ok / max(1, total)

    start = time.perf_counter()
    steps, loss_value, stopped = 0, float("nan"), "epochs"
    best_acc: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    epoch = 0
    model.train()
    for epoch in range(1, config.epochs + 1):  # noqa: B007 - epoch is reported after the loop
        order = rng.permutation(len(examples))
        for b in range(0, len(order), config.batch_size):
            if config.max_steps is not None and steps >= config.max_steps:
                stopped = "max_steps"
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled after {steps} steps")
            if wait_if_paused is not None:
                wait_if_paused()
            idx = order[b : b + config.batch_size]
            batch, y = examples.batch(idx)
            out = model(**batch, labels=y)
            loss = out.loss
            if teacher is not None:
                loss = loss + config.distill_weight * _distill_loss(
                    out.logits, teacher, batch, y, config.distill_temperature
                )
            if anchor:
                loss = loss + config.anchor_lambda * sum(
                    ((trainable[n] - t) ** 2).sum() for n, t in anchor.items()
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            loss_value = float(loss.detach())
            if config.time_budget_s and time.perf_counter() - start > config.time_budget_s:
                stopped = "time_budget"
                break
            if config.max_steps is not None and steps >= config.max_steps:
                stopped = "max_steps"
                break
        if val_examples is not None:
            # A tie goes to the later epoch: a round's validation split holds ~40 rows, so accuracy
            # often ties (1.0 after one epoch) and keeping the first tied epoch under-fit the new
            # data. Learning benchmark, stream seeds 0/1/2: prequential 0.895/0.899/0.912 with the
            # first tied epoch, 0.906/0.899/0.912 with the last; a validation-loss tie-break 0.885/0.899.
            acc = val_accuracy()
            if best_acc is None or acc >= best_acc:
                best_acc, stale = acc, 0
                best_state = {n: p.detach().clone() for n, p in trainable.items()}
            else:
                stale += 1
                if stale >= config.patience:
                    stopped = "early_stop"
        if stopped != "epochs":
            break
    if best_state is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
    model.eval()
    seconds = time.perf_counter() - start
    save_peft_adapter(
        model,
        out_dir,
        manifest,
        version,
        parent=parent,
        num_examples=len(texts),
        metrics={"train_loss": loss_value, "val_accuracy": best_acc, "steps": steps, "stopped": stopped},
    )
    log.info(
        "adapter %s trained: %d steps, %d epochs in %.1fs (%s), loss %.4f",
        version,
        steps,
        epoch,
        seconds,
        stopped,
        loss_value,
    )
    return TrainResult(version, steps, epoch, seconds, loss_value, best_acc, stopped)


def _anchor_model(bundle_dir: Path, manifest, anchor_adapter: Path | None, model):
    """The anchor as a frozen model: the given adapter, else a copy of the model as it starts."""
    import copy

    anchor = new_peft_model(bundle_dir, manifest, anchor_adapter) if anchor_adapter else copy.deepcopy(model)
    anchor.eval()
    for p in anchor.parameters():
        p.requires_grad_(False)
    return anchor


def _anchor_tensors(anchor_model, trainable: dict) -> dict:
    """theta*: the anchor's values for every trainable tensor, copied."""
    import torch

    values = dict(anchor_model.named_parameters())
    missing = [n for n in trainable if n not in values]
    if missing:
        raise ValueError(f"anchor adapter lacks trainable tensors, e.g. {missing[:2]}")
    return {n: values[n].detach().clone().to(torch.float32) for n in trainable}


def _distill_loss(logits, teacher, batch, y, temperature: float):
    """KL(teacher || student) at temperature T, on the targets (texts, or tagged tokens) the
    teacher predicts correctly."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t_logits = teacher(**batch).logits
    n = logits.shape[-1]
    logits, t_logits, y = logits.reshape(-1, n), t_logits.reshape(-1, n), y.reshape(-1)
    keep = (t_logits.argmax(-1) == y) & (y != IGNORE)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    t = temperature
    return F.kl_div(
        F.log_softmax(logits[keep] / t, -1), F.softmax(t_logits[keep] / t, -1), reduction="batchmean"
    ) * (t * t)


class _SequenceExamples:
    """One label per text; batches padded to their longest text, not to max_length (plant texts
    are short)."""

    def __init__(
        self, bundle_dir: Path, manifest: BundleManifest, texts: list[str], labels: Sequence[Target]
    ):
        from transformers import AutoTokenizer

        index = {lab: i for i, lab in enumerate(manifest.labels)}
        unknown = sorted({str(lab) for lab in labels} - set(index))
        if unknown:
            raise ValueError(f"labels not in the bundle's label set: {unknown}")
        self.texts = texts
        self.y = np.array([index[lab] for lab in labels])  # type: ignore[index]
        self.max_length = manifest.max_length
        self.tokenizer = AutoTokenizer.from_pretrained(Path(bundle_dir) / "tokenizer")

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, idx: np.ndarray):
        import torch

        inputs = self.tokenizer(
            [self.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(inputs), torch.as_tensor(self.y[idx])


class _TokenExamples:
    """Each text's serving windows (``agent.entity_serving.window_tokenizer``), one example per
    window, with one tag id per token (-100 on specials, continuation pieces and padding)."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, texts: list[str], spans: Sequence[Target]):
        from agent.entities import TagScheme, token_labels
        from agent.entity_serving import window_tokenizer

        if manifest.entities is None:
            raise ValueError(f"{bundle_dir}: a token-classification manifest without entities")
        if len(spans) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(spans)} span lists")
        known = set(manifest.entities.labels)
        unknown = sorted({s[2] for text_spans in spans for s in text_spans} - known)  # type: ignore[index,union-attr]
        if unknown:
            raise ValueError(f"entity labels not in the bundle's: {unknown}")
        scheme = TagScheme(manifest.entities.labels, manifest.entities.scheme)
        tokenizer = window_tokenizer(bundle_dir, manifest)
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0
        self.rows: list[tuple[list[int], list[int]]] = []
        for encoding, text_spans in zip(tokenizer.encode_batch(texts), spans, strict=True):
            for window in (encoding, *encoding.overflowing):
                self.rows.append((window.ids, token_labels(window, list(text_spans), scheme)))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray):
        import torch

        rows = [self.rows[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        y = np.full((len(rows), width), IGNORE, dtype=np.int64)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)], mask[r, : len(row_ids)], y[r, : len(row_ids)] = row_ids, 1, row_labels
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        return inputs, torch.from_numpy(y)


def _examples(bundle_dir: Path, manifest: BundleManifest, texts: list[str], labels: Sequence[Target]):
    """The training (or validation) examples of the bundle's task."""
    if manifest.task == "token-classification":
        return _TokenExamples(bundle_dir, manifest, texts, labels)
    return _SequenceExamples(bundle_dir, manifest, texts, labels)


def _file_key(param_name: str) -> str:
    """A peft parameter name as ``save_pretrained`` writes it (and as the fleet seeds A by)."""
    return param_name.replace(".modules_to_save.default", "").replace(".default", "")


def _has_frozen_a(adapter_dir: Path, seed: int) -> bool:
    from safetensors.numpy import load_file

    from agent.fed.strategies import frozen_lora_a

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    return bool(a_keys) and all(
        np.array_equal(tensors[k], frozen_lora_a(seed, k, *tensors[k].shape)) for k in a_keys
    )


def _freeze_lora_a(model, seed: int) -> None:
    import torch

    from agent.fed.strategies import frozen_lora_a

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.from_numpy(frozen_lora_a(seed, _file_key(name), *p.shape)))
                p.requires_grad_(False)


def _load_head(model, adapter_dir: Path) -> None:
    """Copy the classifier head of another adapter into ``model`` (the LoRA factors stay as they are)."""
    import torch
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = _file_key(name)
            if ".classifier." in name and p.requires_grad and key in tensors:
                p.copy_(torch.from_numpy(tensors[key]))
