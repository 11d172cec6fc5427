"""The runtime config in each service's own terms, and how the engine is opened.

Pure translations: the services (engine, learner, store) take their own settings objects and
know nothing of the config tree; this module is where the two meet.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from agent.config import BootstrapConfig, RuntimeConfig
from agent.learner import policy as learner_policy
from agent.learner.manager import LearnerSettings
from agent.store import RetentionLimits


class EngineLike(Protocol):
    """What the daemon uses of ``agent.engine.InferenceEngine`` (injected, so tests can choose)."""

    @property
    def labels(self) -> list[str]: ...

    @property
    def adapter_version(self) -> str | None: ...

    def submit(self, texts: list[str]) -> Future: ...

    def stats(self) -> dict: ...

    def apply_config(self, config: Any) -> None: ...

    def close(self) -> None: ...


def engine_config(boot: BootstrapConfig, runtime: RuntimeConfig) -> Any:
    from agent.engine import EngineConfig

    inf = runtime.inference
    return EngineConfig(
        max_batch=inf.max_batch,
        max_batch_tokens=inf.max_batch_tokens,
        max_wait_ms=inf.max_wait_ms,
        top_k=inf.top_k,
        cache_size=inf.cache_size,
        intra_op_threads=boot.engine.intra_op_threads,
        precision=boot.engine.precision,
        provider=boot.engine.provider,
    )


def open_engine(
    boot: BootstrapConfig,
    runtime: RuntimeConfig,
    calibration_texts: list[str] | None = None,
    bundle_dir: Path | None = None,
    adapter_dir: Path | None = None,
) -> EngineLike:
    """An engine on the bootstrap file's bundle (with its ``engine.adapter_dir``), or on
    ``bundle_dir`` (a release from headquarters) with ``adapter_dir``; each bundle its work dir."""
    from agent.engine import InferenceEngine

    if bundle_dir is None or Path(bundle_dir) == boot.bundle:
        bundle_dir, adapter_dir, work = (
            boot.bundle,
            adapter_dir or boot.engine.adapter_dir,
            boot.data_dir / "engine",
        )
    else:
        work = boot.data_dir / f"engine-{Path(bundle_dir).name}"
    return InferenceEngine.open(
        bundle_dir,
        engine_config(boot, runtime),
        adapter_dir=adapter_dir,
        work_dir=work,
        calibration_texts=calibration_texts,
    )


def learner_settings(runtime: RuntimeConfig) -> LearnerSettings:
    """The runtime config's learning section in the learner's own terms."""
    ls = runtime.learning
    return LearnerSettings(
        enabled=ls.enabled,
        triggers=learner_policy.TriggerPolicy(
            min_new_samples=ls.min_new_samples,
            accuracy_drop=ls.accuracy_drop,
            drift_enabled=ls.drift.enabled,
            drift_threshold=ls.drift.threshold,
        ),
        limits=learner_policy.ResourceLimits(
            max_cpu_percent=ls.max_cpu_percent,
            min_free_memory_mb=ls.min_free_memory_mb,
            max_temperature_c=ls.max_temperature_c,
            max_inference_p99_ms=ls.max_inference_p99_ms,
        ),
        gate=learner_policy.GatePolicy(epsilon=ls.gate_epsilon, delta=ls.gate_delta),
        rollback=learner_policy.RollbackPolicy(
            min_feedback=ls.rollback_min_feedback, max_drop=ls.rollback_max_drop
        ),
        schedule=list(ls.schedule),
        epochs=ls.epochs,
        lr=ls.learning_rate,
        lr_frozen_a=ls.frozen_a_learning_rate,
        batch_size=ls.batch_size,
        anchor_lambda=ls.anchor_lambda,
        distill_weight=ls.distill_weight,
        replay_fraction=ls.replay_fraction,
        max_train_samples=ls.max_train_samples,
        time_budget_s=ls.time_budget_s,
        threads=ls.threads,
        keep_versions=ls.keep_versions,
        min_interval_s=ls.min_interval_s,
        linear=ls.fast_learner,
        linear_refresh_samples=ls.fast_learner_refresh_samples,
        linear_refresh_interval_s=ls.fast_learner_refresh_interval_s,
    )


def problems_on_this_box(runtime: RuntimeConfig, cpus: int | None = None) -> list[str]:
    """What in a valid config would still break this box: checked before it is applied."""
    cpus = cpus or os.cpu_count() or 1
    problems = []
    if runtime.learning.threads > cpus:
        problems.append(
            f"learning.threads: {runtime.learning.threads} torch threads on a box with {cpus} CPUs would "
            "starve inference"
        )
    return problems


def retention_limits(runtime: RuntimeConfig) -> RetentionLimits:
    s = runtime.store
    return RetentionLimits(
        max_samples=s.max_samples,
        max_sample_bytes=s.max_sample_bytes,
        holdout_fraction=s.holdout_fraction,
        max_predictions=s.max_predictions,
        prediction_retention_days=s.prediction_retention_days,
        max_feedback=s.max_feedback,
    )
