"""LoRA adapters: the PEFT directory on disk, its checks, and its conversion for ONNX Runtime.

An adapter directory is what ``peft.PeftModel.save_pretrained`` writes (``adapter_model.safetensors``
+ ``adapter_config.json``), loadable by ``PeftModel.from_pretrained`` on the bundle's base, plus our
``edge_adapter.json`` (base hash, version, parent, labels, metrics). Everything here is numpy: the
inference path reads adapters without torch.

Before anything is activated: known keys only, every target of every layer present, shapes,
dtypes, finiteness, labels and the base hash are checked; a bad adapter raises ``AdapterError``.
The directory may also carry the fast learner (``agent.linear``) and the gate's choice of what
serves; they are read and checked here too, so the directory swaps and rolls back as one unit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import BundleManifest, LoraTarget
from agent.lora_graph import DENSE_TARGETS, HEAD_BIAS, HEAD_WEIGHT, QKV_BRANCH, lora_input_names

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
META = "edge_adapter.json"
QKV_SLOT = {"query": 0, "key": 1, "value": 2}
MAX_ADAPTER_BYTES = 64 << 20

# Our target names -> the module path inside a BERT layer, as PEFT names the tensors.
PEFT_MODULES: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_TARGET_OF_MODULE = {m: t for t, m in PEFT_MODULES.items()}
_MODULES = "|".join(re.escape(m) for m in PEFT_MODULES.values())
_LORA_KEY = re.compile(
    rf"^base_model\.model\.bert\.encoder\.layer\.(\d+)\.({_MODULES})\.lora_([AB])\.weight$"
)
_HEAD_KEY = re.compile(r"^base_model\.model\.classifier\.(weight|bias)$")


class AdapterError(ValueError):
    """An adapter that must not be activated; the message says why."""


@dataclass
class AdapterMeta:
    version: str
    base_hash: str
    labels: list[str]
    parent: str | None = None
    created: float = field(default_factory=time.time)
    num_examples: int = 0
    round: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    signature: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterMeta:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise AdapterError(f"{META}: unknown fields {sorted(unknown)}")
        try:
            meta = cls(**data)
        except TypeError as e:
            raise AdapterError(f"{META}: {e}") from e
        if not isinstance(meta.version, str) or not meta.version:
            raise AdapterError(f"{META}: version must be a non-empty string")
        if not isinstance(meta.labels, list) or not all(isinstance(x, str) for x in meta.labels):
            raise AdapterError(f"{META}: labels must be a list of strings")
        return meta


@dataclass(frozen=True)
class OrtAdapter:
    """An adapter converted to the graph's input names, ready for ``onnxruntime.AdapterFormat``."""

    meta: AdapterMeta
    arrays: dict[str, np.ndarray]
    # The fast learner saved beside the adapter (``agent.linear.LinearModel``), if any, and what the
    # gate chose to serve from the directory: "transformer", "linear", "combined" or "crf".
    linear: Any = None
    serving: str = "transformer"
    # sha256 of the LoRA weights file, scale and labels: a unit whose fast learner alone changed (a linear refresh)
    # swaps in without a new merged session.
    weights_digest: str = ""
    # A token-classification unit's fast entity learner (``agent.entity_crf.EntityCrf``); serves
    # where ``serving`` is "crf".
    crf: Any = None

    @property
    def version(self) -> str:
        return self.meta.version


def read_adapter(adapter_dir: Path, bundle: BundleManifest) -> OrtAdapter:
    """Load, check and convert a PEFT adapter directory for ``bundle``; raise ``AdapterError``."""
    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir)
    if meta.base_hash != bundle.base_hash:
        raise AdapterError(
            f"adapter {meta.version} was trained on base {meta.base_hash[:12]}, this bundle is {bundle.base_hash[:12]}"
        )
    cfg = _read_json(adapter_dir / PEFT_CONFIG)
    scale = _lora_scale(cfg)
    tensors, raw = _read_tensors(adapter_dir / WEIGHTS)
    h = hashlib.sha256(raw)
    h.update(json.dumps([scale, meta.labels], sort_keys=True).encode())
    digest = h.hexdigest()
    labels = meta.labels or bundle.labels
    arrays = to_ort_arrays(tensors, bundle, scale, labels)
    from agent.linear import read_linear, read_serving

    linear = read_linear(adapter_dir, labels)
    serving = read_serving(adapter_dir)
    crf = None
    if bundle.entities is not None:  # a token-classification bundle: its fast learner is a CRF
        from agent.entity_crf import CrfError, read_crf

        try:
            crf = read_crf(adapter_dir, bundle.entities.labels)
        except CrfError as e:
            raise AdapterError(f"adapter {meta.version}: {e}") from None
    # What serves must be there: a token unit's CRF (alone or combined), a classifier's linear model.
    needs_crf = serving == "crf" or (serving == "combined" and bundle.entities is not None)
    if needs_crf and crf is None:
        raise AdapterError(f"adapter {meta.version} is to serve {serving!r} but carries no CRF")
    if not needs_crf and serving in ("linear", "combined") and linear is None:
        raise AdapterError(f"adapter {meta.version} is to serve {serving!r} but carries no linear model")
    return OrtAdapter(meta, arrays, linear, serving, digest, crf)


def peft_target_modules(targets: list[LoraTarget]) -> str:
    """PEFT ``target_modules`` for our target names: a regex PEFT matches against full module names.

    A regex, not suffixes: the suffix "output.dense" would also match "attention.output.dense".
    """
    unknown = sorted(set(targets) - set(PEFT_MODULES))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {list(PEFT_MODULES)}, got {targets}")
    modules = "|".join(re.escape(PEFT_MODULES[t]) for t in targets)
    return rf".*\.encoder\.layer\.\d+\.({modules})"


def to_ort_arrays(
    tensors: dict[str, np.ndarray], bundle: BundleManifest, scale: float, labels: list[str]
) -> dict[str, np.ndarray]:
    """PEFT tensors -> graph inputs, with the LoRA scale folded into B (any alpha runs on one graph).

    q/k/v are packed per layer: ``A = [A_q^T | A_v^T]`` and ``B`` block rows in q|k|v columns.
    Each dense target is its own pair ``A^T``, ``B^T``. Targets the adapter does not train keep
    the graph's empty default.
    """
    h, layers = bundle.hidden_size, bundle.num_layers
    lora: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if (m := _LORA_KEY.match(key)) is not None:
            layer, target, which = int(m.group(1)), _TARGET_OF_MODULE[m.group(2)], m.group(3)
            if layer >= layers:
                raise AdapterError(f"{key}: layer {layer} does not exist (the base has {layers})")
            lora.setdefault((layer, target), {})[which] = value
        elif (m := _HEAD_KEY.match(key)) is not None:
            head[m.group(1)] = value
        else:
            raise AdapterError(
                f"unexpected tensor {key!r}: not a LoRA factor of a layer projection or the head"
            )
    if not lora:
        raise AdapterError("adapter has no LoRA tensors")
    out: dict[str, np.ndarray] = {}
    trained = {t for _, t in lora}
    qkv = sorted(trained & set(QKV_SLOT), key=QKV_SLOT.__getitem__)
    for layer in range(layers):
        if qkv:
            out.update(_packed_qkv(lora, layer, qkv, bundle, scale))
        for target in DENSE_TARGETS:
            if target in trained:
                out.update(_dense(lora, layer, target, bundle, scale))
    if head:
        if set(head) != {"weight", "bias"}:
            raise AdapterError("classifier head needs both weight and bias")
        w, b = _checked(head["weight"], "head weight"), _checked(head["bias"], "head bias")
        if w.shape != (len(labels), h) or b.shape != (len(labels),):
            raise AdapterError(
                f"head shapes weight{w.shape} bias{b.shape} do not fit {len(labels)} labels x hidden {h}"
            )
        out[HEAD_WEIGHT], out[HEAD_BIAS] = w, b
    elif labels != bundle.labels:
        raise AdapterError("adapter declares its own labels but carries no classifier head")
    return out


def _factor_pair(
    lora: dict[tuple[int, str], dict[str, np.ndarray]], layer: int, target: str, n_in: int, n_out: int
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``lora_A`` [r, n_in] and ``lora_B`` [n_out, r] of one target, checked."""
    pair = lora.get((layer, target), {})
    if set(pair) != {"A", "B"}:
        raise AdapterError(f"layer {layer} {target}: lora_A and lora_B must both be present")
    a = _checked(pair["A"], f"layer {layer} {target} lora_A")
    b = _checked(pair["B"], f"layer {layer} {target} lora_B")
    r = a.shape[0]
    if a.shape != (r, n_in) or b.shape != (n_out, r):
        raise AdapterError(
            f"layer {layer} {target}: shapes A{a.shape} B{b.shape}, expected A({r}, {n_in}) B({n_out}, {r})"
        )
    return a, b


def _branch_inputs(bundle: BundleManifest, layer: int, branch: str) -> tuple[str, str]:
    names = lora_input_names(layer, branch)
    # Bundles list their graph's LoRA inputs; one built before the dense branches existed has
    # only the packed q/k/v ones (the packed branch is in every bundle's graph).
    listed = bundle.lora.graph_inputs
    if (branch != QKV_BRANCH or listed) and not all(n in listed for n in names):
        raise AdapterError(
            f"adapter trains {branch}, but this bundle's graph has no LoRA branch for it: rebuild the "
            "bundle (`edge-agent model build`) or train with the bundle's own targets"
        )
    return names


def _packed_qkv(
    lora, layer: int, targets: list[str], bundle: BundleManifest, scale: float
) -> dict[str, np.ndarray]:
    h = bundle.hidden_size
    a_blocks, b_rows = [], []
    for target in targets:
        a, b = _factor_pair(lora, layer, target, h, h)
        a_blocks.append(a.T)
        row = np.zeros((a.shape[0], 3 * h), np.float32)
        slot = QKV_SLOT[target]
        row[:, slot * h : (slot + 1) * h] = b.T * scale
        b_rows.append(row)
    a_name, b_name = _branch_inputs(bundle, layer, QKV_BRANCH)
    return {
        a_name: np.ascontiguousarray(np.concatenate(a_blocks, axis=1), dtype=np.float32),
        b_name: np.ascontiguousarray(np.concatenate(b_rows, axis=0), dtype=np.float32),
    }


def _dense(lora, layer: int, target: str, bundle: BundleManifest, scale: float) -> dict[str, np.ndarray]:
    a_name, b_name = _branch_inputs(bundle, layer, target)
    n_in, n_out = bundle.lora.graph_inputs[a_name][0], bundle.lora.graph_inputs[b_name][1]
    if not isinstance(n_in, int) or not isinstance(n_out, int):
        raise AdapterError(f"bundle manifest: {a_name}/{b_name} shapes are not fixed sizes")
    a, b = _factor_pair(lora, layer, target, n_in, n_out)
    return {
        a_name: np.ascontiguousarray(a.T, dtype=np.float32),
        b_name: np.ascontiguousarray(b.T * scale, dtype=np.float32),
    }


def _checked(value: np.ndarray, what: str) -> np.ndarray:
    if value.dtype not in (np.float32, np.float16):
        raise AdapterError(f"{what}: dtype {value.dtype}, expected float32 (or float16)")
    value = value.astype(np.float32, copy=False)
    if not np.isfinite(value).all():
        raise AdapterError(f"{what}: contains NaN or Inf")
    return value


def _lora_scale(cfg: dict[str, Any]) -> float:
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise AdapterError(f"{PEFT_CONFIG}: {flag}=true is not supported by the inference graph")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{PEFT_CONFIG}: per-module rank/alpha patterns are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"{PEFT_CONFIG}: r and lora_alpha must be positive numbers")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{path.name} is missing in {path.parent}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path.name}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path.name}: expected a JSON object")
    return data


def read_meta(adapter_dir: Path) -> AdapterMeta:
    return AdapterMeta.from_json(_read_json(adapter_dir / META))


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], bytes]:
    """The tensors and the file's bytes (read once: the weights digest hashes them)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise AdapterError(f"{path.name} is missing in {path.parent}") from e
    if size > MAX_ADAPTER_BYTES:
        raise AdapterError(f"{path.name}: {size} bytes exceeds the {MAX_ADAPTER_BYTES} byte limit")
    try:
        raw = path.read_bytes()
        return load(raw), raw
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path.name}: unreadable safetensors file ({e})") from e


def write_ort_adapter(adapter: OrtAdapter, path: Path) -> Path:
    """Write the ``.onnx_adapter`` file ONNX Runtime memory-maps (its Python API loads files only)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in adapter.arrays.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    fmt.export_adapter(str(tmp))
    os.replace(tmp, path)
    return path


def write_meta(adapter_dir: Path, meta: AdapterMeta) -> None:
    """Add our manifest beside what ``PeftModel.save_pretrained`` wrote."""
    tmp = Path(adapter_dir) / f".{META}.tmp"
    tmp.write_text(json.dumps(meta.__dict__, indent=2))
    os.replace(tmp, Path(adapter_dir) / META)
