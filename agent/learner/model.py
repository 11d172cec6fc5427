"""Rebuild the bundle's fp32 torch model and wrap it with peft."""

from __future__ import annotations

import time
from pathlib import Path

from agent.adapters import AdapterMeta, peft_target_modules, write_meta
from agent.bundle import BASE_WEIGHTS, BundleManifest, load_manifest
from agent.durable import staged_dir

# peft's task type for each bundle task (it puts the head in ``modules_to_save`` for both).
PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS"}


def load_base_model(bundle_dir: Path, manifest: BundleManifest | None = None):
    """The bundle's base as a ``transformers`` model of its task, weights from ``base.safetensors``."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    bundle_dir = Path(bundle_dir)
    manifest = manifest or load_manifest(bundle_dir)
    config = AutoConfig.from_pretrained(bundle_dir / "hf")
    auto = (
        AutoModelForTokenClassification
        if manifest.task == "token-classification"
        else AutoModelForSequenceClassification
    )
    with torch.device("cpu"):
        model = auto.from_config(config, attn_implementation="eager")
    state = load_file(str(bundle_dir / BASE_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied or buffer-only keys (e.g. position_ids) may differ between versions; weights may not.
    real_missing = [k for k in missing if not k.endswith("position_ids")]
    if real_missing or unexpected:
        raise ValueError(
            f"base.safetensors does not fit the config: missing {real_missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def new_peft_model(
    bundle_dir: Path, manifest: BundleManifest | None = None, init_adapter: Path | None = None
):
    """The base wrapped with a fresh LoRA (the bundle's spec) or with an existing adapter to continue."""
    from peft import LoraConfig, PeftModel, get_peft_model

    manifest = manifest or load_manifest(bundle_dir)
    base = load_base_model(bundle_dir, manifest)
    if init_adapter is not None:
        return PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    spec = manifest.lora
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=peft_target_modules(spec.targets),
        lora_dropout=0.0,
        task_type=PEFT_TASK_TYPES[manifest.task],
        bias="none",
    )
    return get_peft_model(base, config)


def save_peft_adapter(
    peft_model, out_dir: Path, manifest: BundleManifest, version: str, **meta_fields
) -> AdapterMeta:
    """``save_pretrained`` plus our manifest, written to a staged directory renamed into place."""
    _dedupe_modules_to_save(peft_model)
    with staged_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)
        meta = AdapterMeta(
            version=version,
            base_hash=manifest.base_hash,
            labels=list(manifest.labels),
            created=time.time(),
            **meta_fields,
        )
        write_meta(tmp, meta)
    return meta


def _dedupe_modules_to_save(peft_model) -> None:
    """Drop repeated ``modules_to_save`` entries before saving.

    ``PeftModel.from_pretrained`` on a SEQ_CLS adapter appends the task's own head names
    (``classifier``, ``score``) to the ``modules_to_save`` it loaded, so a round that continues the
    last one saved them once more: 2 entries, then 4, ... 14 after the sixth round. Order kept.
    """
    for cfg in getattr(peft_model, "peft_config", {}).values():
        modules = getattr(cfg, "modules_to_save", None)
        if modules:
            cfg.modules_to_save = list(dict.fromkeys(modules))
