"""Which execution provider and precision a box runs: pure decisions, tested without hardware."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


@dataclass(frozen=True)
class ExecutionPlan:
    providers: list[str]
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "int8" | "fp16" | "auto" (CPU: decided by measurement)
    note: str = ""


def plan_execution(
    available: list[str], provider: str, precision: str, bundle_precisions: set[str]
) -> ExecutionPlan:
    """Pick providers and precision from what ORT offers, what was asked for and what the bundle has.

    ``provider``: auto | cpu | cuda | tensorrt. A GPU provider that is asked for but absent falls
    back to CPU with a note, so one config file serves a fleet of mixed boxes.
    """
    gpu_ok = CUDA in available and "fp16" in bundle_precisions
    note = ""
    if provider in ("cuda", "tensorrt", "auto") and gpu_ok:
        providers = [CUDA, CPU]
        if provider == "tensorrt":
            if TENSORRT in available:
                providers = [TENSORRT, CUDA, CPU]
            else:
                note = "TensorRT provider not available; using CUDA"
        chosen = precision if precision in ("fp16", "fp32") else "fp16"
        return ExecutionPlan(providers, "cuda", chosen, note)
    if provider in ("cuda", "tensorrt"):
        note = f"{provider} requested but not available (providers: {', '.join(available)}); using CPU"
    cpu_precisions = bundle_precisions & {"fp32", "int8"}
    if precision in ("fp32", "int8") and precision in cpu_precisions:
        chosen = precision
    elif precision == "auto" and cpu_precisions == {"fp32", "int8"}:
        chosen = "auto"
    else:
        chosen = "fp32" if "fp32" in cpu_precisions else next(iter(sorted(cpu_precisions)), "fp32")
        if precision not in ("auto", chosen):
            note = (note + "; " if note else "") + f"precision {precision} not usable on CPU; using {chosen}"
    return ExecutionPlan([CPU], "cpu", chosen, note)


@dataclass(frozen=True)
class PrecisionTrial:
    median_ms: float
    agreement: float  # top-1 agreement with fp32 on calibration texts (1.0 for fp32 itself)


def choose_cpu_precision(
    trials: dict[str, PrecisionTrial], min_agreement: float = 0.99, min_gain: float = 0.05
) -> str:
    """The fastest precision whose predictions agree with fp32; a lower precision must win by ``min_gain``."""
    if "fp32" not in trials:
        raise ValueError("fp32 trial is the reference and must be present")
    best = "fp32"
    for name, t in trials.items():
        if name == "fp32" or t.agreement < min_agreement:
            continue
        if t.median_ms < trials[best].median_ms * (1.0 - min_gain):
            best = name
    return best
