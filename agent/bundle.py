"""The model bundle on disk: manifest, paths and integrity checks. No torch here.

A bundle is a directory written by ``edge-agent model build`` (see ``agent.build``):

    manifest.json        what everything downstream checks (base hash, labels, LoRA spec, precisions)
    model.fp32.onnx      fused fp32 graph with LoRA inputs (CPU)
    model.int8.onnx      same graph, base MatMuls INT8 (CPU); LoRA branches and head stay fp32
    model.fp16.onnx      same graph in FP16 (CUDA)
    base.safetensors     fp32 weights the learner trains against (its sha256 is the base hash)
    hf/config.json       Hugging Face config to rebuild the torch model for training
    tokenizer/           tokenizer.json (+ HF tokenizer files)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"
BASE_WEIGHTS = "base.safetensors"
TOKENIZER_JSON = "tokenizer/tokenizer.json"
Precision = Literal["fp32", "int8", "fp16"]
# Projections of a BERT layer that can carry a LoRA branch (``agent.lora_graph``).
LoraTarget = Literal["query", "key", "value", "attention_output", "intermediate", "output"]
ALL_LORA_TARGETS: tuple[LoraTarget, ...] = get_args(LoraTarget)


# What the head predicts: one label per text, or one tag per token (entities). Every part that
# behaves differently by task asks the manifest's ``task``, nothing else.
Task = Literal["sequence-classification", "token-classification"]
TASKS: tuple[Task, ...] = get_args(Task)
TagSchemeName = Literal["BIO", "BILOU"]


class EntitySpec(BaseModel):
    """A token-classification bundle's entities: its head's outputs are ``agent.entities.TagScheme``
    tags of these labels (``labels`` in the manifest, "O" first)."""

    model_config = ConfigDict(extra="forbid")
    scheme: TagSchemeName = "BIO"
    labels: list[str] = Field(min_length=1, description="entity labels, e.g. ASSET, PART")


class BundleError(ValueError):
    """A bundle is missing, incomplete or does not match what the caller expects."""


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, gt=0, description="LoRA rank r the learner trains with")
    alpha: int = Field(16, gt=0, description="LoRA alpha; the scale alpha/r is folded into B on conversion")
    # All projections by default: on plant texts LoRA on query/value only stayed 2-3 points under
    # a full fine-tune and 6 under TF-IDF after drift (the learning benchmark, README).
    targets: list[LoraTarget] = Field(
        default_factory=lambda: list(ALL_LORA_TARGETS),
        description="projections the learner trains a LoRA branch on",
    )
    layout: Literal["qkv-packed"] = Field(
        "qkv-packed",
        description="per layer: one A [H,R] and B [R,3H] with q|k|v in column blocks, and one A/B pair "
        "for each of attention_output, intermediate and output (bundles built before 2026-12 lack these)",
    )
    graph_inputs: dict[str, list[int | str]] = Field(
        default_factory=dict, description="overridable LoRA inputs of the graph and their shapes"
    )


class PrecisionFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    device: Literal["cpu", "cuda"]
    quantization: dict[str, object] = Field(default_factory=dict)
    size_bytes: int = 0


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = 1
    name: str
    source: str = Field(description="the encoder the bundle was built from")
    architecture: str
    base_hash: str = Field(description="sha256 of base.safetensors; adapters name the base they fit")
    task: Task = "sequence-classification"
    labels: list[str] = Field(description="the head's outputs: classes, or tags for token classification")
    entities: EntitySpec | None = Field(None, description="token classification only")
    hidden_size: int
    num_layers: int
    num_heads: int
    max_length: int
    lora: LoraSpec
    head: dict[str, str] = Field(description="graph input names of the overridable classifier head")
    outputs: list[str]
    precisions: dict[str, PrecisionFile]
    opset: int
    tools: dict[str, str]
    verification: dict[str, float] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle_dir: Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST}; build one with `edge-agent model build`")
    try:
        return BundleManifest.model_validate_json(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path}: invalid manifest: {e}") from e


def check_bundle(bundle_dir: Path, verify_hash: bool = True) -> list[str]:
    """Every problem found in a bundle, as sentences; an empty list means it is usable."""
    bundle_dir = Path(bundle_dir)
    try:
        m = load_manifest(bundle_dir)
    except BundleError as e:
        return [str(e)]
    problems = []
    for name, p in m.precisions.items():
        f = bundle_dir / p.file
        if not f.is_file():
            problems.append(f"precision {name}: {p.file} is missing")
        elif p.size_bytes and f.stat().st_size != p.size_bytes:
            problems.append(
                f"precision {name}: {p.file} has {f.stat().st_size} bytes, manifest says {p.size_bytes}"
            )
    if not (bundle_dir / TOKENIZER_JSON).is_file():
        problems.append(f"{TOKENIZER_JSON} is missing")
    base = bundle_dir / BASE_WEIGHTS
    if not base.is_file():
        problems.append(f"{BASE_WEIGHTS} is missing")
    elif verify_hash and sha256_file(base) != m.base_hash:
        problems.append(f"{BASE_WEIGHTS} does not match base_hash {m.base_hash[:12]}")
    return problems
