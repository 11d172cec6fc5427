"""A tiny random BERT with the default tokenizer: real architecture, milliseconds to run."""

from __future__ import annotations

from pathlib import Path

TINY_LABELS = ["normal", "electrical", "mechanical", "thermal"]

# A keyword task the tiny random BERT learns in seconds (learner tests).
KEYWORDS = {
    "electrical": ["breaker tripped", "fuse blown", "short circuit", "earth fault"],
    "mechanical": ["bearing noise", "belt worn", "gear backlash", "shaft misaligned"],
    "thermal": ["overheating", "temperature high", "fan failed hot", "thermal alarm"],
    "normal": ["cycle complete", "shift handover", "all ok", "production started"],
}


def keyword_samples(n: int, seed: int, shuffle_labels: bool = False) -> list[tuple[str, str]]:
    """(text, label) pairs; with ``shuffle_labels`` the labels are random (a poisoned batch)."""
    import random

    rng = random.Random(seed)
    labels = list(KEYWORDS)
    out = []
    for _ in range(n):
        label = rng.choice(labels)
        text = f"{rng.choice(KEYWORDS[label])} on machine M{rng.randint(1, 40)} line {rng.randint(1, 5)}"
        out.append((text, rng.choice(labels) if shuffle_labels else label))
    return out


def tiny_bert_config(vocab_size: int, **labels):
    """Two layers of 32 wide: the real BERT architecture at a size that runs in milliseconds."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **labels,
    )


def make_tiny_bert(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from agent.build import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    config = tiny_bert_config(tokenizer.vocab_size, num_labels=len(TINY_LABELS))
    model = BertForSequenceClassification(config).eval()
    # Random init gives near-identical logits for every text; widen the weights so that
    # predictions and adapters visibly change outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_random_adapter(
    bundle_dir: Path,
    out: Path,
    seed: int,
    version: str,
    b_std: float = 0.5,
    head_std: float = 0.5,
    targets: list[str] | None = None,
) -> Path:
    """A peft adapter with non-zero B and a perturbed head, so it visibly changes the output.

    ``targets``: train only these projections instead of the bundle's LoRA targets.
    """
    import torch

    from agent.bundle import load_manifest
    from agent.learner.model import new_peft_model, save_peft_adapter

    manifest = load_manifest(bundle_dir)
    if targets is not None:
        manifest = manifest.model_copy(update={"lora": manifest.lora.model_copy(update={"targets": targets})})
    model = new_peft_model(bundle_dir, manifest)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * head_std)
    save_peft_adapter(model, out, manifest, version)
    return out


def make_tiny_token_bert(out: Path, num_tags: int, seed: int = 0, hidden: int = 64) -> Path:
    """A tiny random BERT with a per-token head that the learner can teach work-order entities:
    64 wide and unscaled (at 32 wide, or with ``make_tiny_bert``'s widened weights, its random
    features keep entity F1 of a LoRA round near 0.15, too little to tell learning from noise)."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from agent.build import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    config = tiny_bert_config(tokenizer.vocab_size, num_labels=num_tags)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    BertForTokenClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_token_bundle(
    root: Path, precisions: tuple[str, ...] = ("fp32",), tag_scheme: str = "BIO"
) -> Path:
    """A token-classification bundle of ``make_tiny_token_bert`` for the work-order entities
    (models/entities.json), 48-token windows (long texts need several): ``root / "bundle"``."""
    import json

    from agent.build import build_bundle
    from agent.entities import TagScheme

    labels = json.loads((Path(__file__).parents[1] / "models" / "entities.json").read_text())["labels"]
    build_bundle(
        root / "bundle",
        model_path=make_tiny_token_bert(root / "hf-model", len(TagScheme(labels, tag_scheme).tags)),
        labels=labels,
        precisions=precisions,
        max_length=48,
        task="token-classification",
        tag_scheme=tag_scheme,
    )
    return root / "bundle"
