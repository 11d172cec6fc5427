"""What every adapter of a fleet looks like, derived from the bundle's manifest: keys and shapes.

Box and aggregator hold the same bundle (same base hash), so both derive the same ``AdapterSpec``:
the PEFT tensor names and shapes of a full adapter, which of them an upload carries for a given
strategy (FFA-LoRA: B and the head, A is implied by the fleet seed), and the ``adapter_config.json``
a global is written with. ``check_tensors`` is the aggregator's and the box's shape check;
``write_adapter_dir`` lays a global out as the adapter directory the learner and the engine load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.adapters import META, PEFT_CONFIG, PEFT_MODULES, WEIGHTS, AdapterMeta, peft_target_modules
from agent.bundle import BundleManifest
from agent.durable import staged_dir
from agent.lora_graph import DENSE_TARGETS, lora_input_names

LAYER_KEY = "base_model.model.bert.encoder.layer.{layer}.{module}.lora_{which}.weight"
HEAD_KEYS = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")


class SpecError(ValueError):
    """Tensors that do not fit the fleet's adapter spec; the message names the first problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AdapterSpec:
    base_hash: str
    labels: tuple[str, ...]
    rank: int
    alpha: int
    targets: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]  # every tensor of a full adapter

    @classmethod
    def from_manifest(cls, m: BundleManifest) -> AdapterSpec:
        h, r = m.hidden_size, m.lora.rank
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(m.num_layers):
            for target in m.lora.targets:
                n_in, n_out = h, h
                if target in DENSE_TARGETS:
                    a_name, b_name = lora_input_names(layer, target)
                    a_shape, b_shape = m.lora.graph_inputs[a_name], m.lora.graph_inputs[b_name]
                    n_in, n_out = int(a_shape[0]), int(b_shape[1])
                module = PEFT_MODULES[target]
                shapes[LAYER_KEY.format(layer=layer, module=module, which="A")] = (r, n_in)
                shapes[LAYER_KEY.format(layer=layer, module=module, which="B")] = (n_out, r)
        shapes[HEAD_KEYS[0]] = (len(m.labels), h)
        shapes[HEAD_KEYS[1]] = (len(m.labels),)
        return cls(m.base_hash, tuple(m.labels), r, m.lora.alpha, tuple(m.lora.targets), shapes)

    @property
    def a_keys(self) -> list[str]:
        return sorted(k for k in self.shapes if k.endswith(".lora_A.weight"))

    def upload_keys(self, freezes_a: bool) -> list[str]:
        """What a box sends: everything, or everything but the frozen A factors."""
        return sorted(k for k in self.shapes if not (freezes_a and k.endswith(".lora_A.weight")))

    def check_tensors(self, tensors: Mapping[str, np.ndarray], keys: list[str]) -> None:
        """Exactly ``keys``, each with its shape, float32 and finite; raises SpecError."""
        missing = sorted(set(keys) - set(tensors))
        extra = sorted(set(tensors) - set(keys))
        if missing or extra:
            raise SpecError(
                "wrong_keys",
                f"tensors do not fit the fleet's adapter: missing {missing[:3]}, unexpected {extra[:3]}",
            )
        for key in keys:
            value = tensors[key]
            if tuple(value.shape) != self.shapes[key]:
                raise SpecError(
                    "wrong_shape", f"{key}: shape {tuple(value.shape)}, expected {self.shapes[key]}"
                )
            if value.dtype != np.float32:
                raise SpecError("wrong_dtype", f"{key}: dtype {value.dtype}, expected float32")
            if not np.isfinite(value).all():
                raise SpecError("non_finite", f"{key}: contains NaN or Inf")

    def peft_config(self) -> dict[str, Any]:
        """``adapter_config.json`` of an adapter in this spec, as ``peft.PeftModel.from_pretrained`` reads it."""
        return {
            "peft_type": "LORA",
            "task_type": "SEQ_CLS",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": peft_target_modules(list(self.targets)),  # type: ignore[arg-type]
            "lora_dropout": 0.0,
            "bias": "none",
            "modules_to_save": ["classifier"],
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
        }


def write_adapter_dir(path: Path, tensors_bytes: bytes, spec: AdapterSpec, meta: AdapterMeta) -> Path:
    """A global as an adapter directory: the safetensors bytes as received (``adapter_model.safetensors``),
    ``adapter_config.json`` from ``spec.peft_config()`` and our ``edge_adapter.json``; staged, fsynced
    and renamed into place (``path`` is replaced). The caller has checked the tensors."""
    with staged_dir(path) as tmp:
        (tmp / WEIGHTS).write_bytes(tensors_bytes)
        (tmp / PEFT_CONFIG).write_text(json.dumps(spec.peft_config(), indent=2))
        (tmp / META).write_text(json.dumps(meta.__dict__, indent=2))
    return Path(path)
