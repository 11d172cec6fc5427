"""LoRA adapter tensors as federation sees them: PEFT key pairs, ΔW, FFA-LoRA's frozen A, upload checks.

An adapter is a mapping of PEFT tensor names to float arrays. LoRA factors come in pairs,
``{prefix}.lora_A.weight`` ``[r, n_in]`` and ``{prefix}.lora_B.weight`` ``[n_out, r]``; every other
tensor (the classifier head) is *plain* and is averaged as is. A pair's update is
``ΔW = scale·B·A`` with ``scale = lora_alpha / r`` fixed by the bundle spec and so identical across the
fleet: every function here and in the aggregation modules works on ``B·A`` and leaves the scale out.

FFA-LoRA (arXiv 2403.12313) freezes A: ``frozen_lora_a`` draws it from the fleet seed, the same on
every box and at the aggregator, so a box uploads B and the head only and ``with_frozen_a`` completes
the upload. ``ClientUpdate`` is one box's upload; ``StrategyError`` is what every aggregation module
(``combines``, ``update_batch``, ``low_rank``, ``strategies``, ``partial_sums``) raises on input it
cannot use. Nothing here imports I/O, torch or MQTT: the learner, the box and the aggregator all use it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

Tensors = Mapping[str, np.ndarray]


_F32 = np.float32
_F64 = np.float64
# Versioned domain tag of the frozen-A scheme: a deliberate change of the scheme changes the tag, so
# boxes and aggregators of different schemes disagree loudly (mismatched A) rather than silently.
_FROZEN_A_TAG = b"edge-agent/ffa-lora/lora_A/v1\x00"


class StrategyError(ValueError):
    """Input a strategy cannot aggregate (different keys or shapes, mismatched frozen A, no weight,
    non-finite values, unknown strategy or parameter); the message says which update and tensor."""


@dataclass(frozen=True)
class ClientUpdate:
    """One box's upload: its adapter tensors (PEFT names) and the number of examples it trained on."""

    tensors: Mapping[str, np.ndarray]
    num_examples: int


class KeySplit(NamedTuple):
    """An adapter's tensor names: LoRA pairs by prefix, ``(A key, B key)``, and the plain tensors."""

    pairs: dict[str, tuple[str, str]]
    plain: tuple[str, ...]


def split_keys(keys: Iterable[str]) -> KeySplit:
    """Group tensor names into LoRA pairs (prefix -> (A key, B key)) and plain tensors.

    A pair is recorded when its B is present: an FFA upload carries B only (A is frozen and known to
    the aggregator), so the A key of a pair may be absent; a lora_A without its lora_B is an error.
    """
    keys = list(keys)
    present = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    plain: list[str] = []
    for key in keys:
        if key.endswith(A_SUFFIX):
            prefix = key[: -len(A_SUFFIX)]
            if prefix + B_SUFFIX not in present:
                raise StrategyError(f"{key}: lora_A without its lora_B")
            pairs[prefix] = (key, prefix + B_SUFFIX)
        elif key.endswith(B_SUFFIX):
            prefix = key[: -len(B_SUFFIX)]
            pairs[prefix] = (prefix + A_SUFFIX, key)
        else:
            plain.append(key)
    return KeySplit(pairs, tuple(plain))


def pair_arrays(tensors: Tensors, prefix: str, a_key: str, b_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A pair's (A, B), checked to be present and to make a LoRA pair."""
    if a_key not in tensors:
        raise StrategyError(f"{b_key}: no {a_key} (an FFA upload needs the frozen A: see with_frozen_a)")
    a, b = np.asarray(tensors[a_key]), np.asarray(tensors[b_key])
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise StrategyError(f"{prefix}: shapes A{a.shape} B{b.shape} do not make a LoRA pair")
    return a, b


def delta_w(tensors: Tensors) -> dict[str, np.ndarray]:
    """Each LoRA pair's update ``B·A`` (without the fleet-wide scale alpha/r), by prefix, in float64.

    float64 because this is the reference quantity that tests and ``exact_error`` compare against.
    """
    out = {}
    for prefix, (a_key, b_key) in split_keys(tensors).pairs.items():
        a, b = pair_arrays(tensors, prefix, a_key, b_key)
        out[prefix] = b.astype(_F64) @ a.astype(_F64)
    return out


def same_array(x: np.ndarray, y: np.ndarray) -> bool:
    return x is y or (x.shape == y.shape and bool(np.array_equal(x, y)))


def frozen_lora_a(seed: int, key: str, rank: int, n_in: int) -> np.ndarray:
    """The frozen ``lora_A`` of FFA-LoRA for tensor ``key``: the same on every box and at the aggregator.

    Drawn like PEFT's default lora_A init, ``kaiming_uniform_(a=sqrt(5))``, which is
    ``U(-1/sqrt(n_in), 1/sqrt(n_in))``; float32, shape ``[rank, n_in]``. The generator is numpy's
    ``default_rng`` (PCG64) seeded by ``SeedSequence([seed, sha256(tag + key)])``: a stable hash, not
    Python's salted ``hash``. Values are built from the bit generator's raw 64-bit output exactly as
    ``Generator.random`` does, because numpy guarantees bit-generator streams across versions but not
    the distribution methods: a box and the aggregator on different numpy versions still agree.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise StrategyError(f"frozen A seed must be a non-negative integer, got {seed!r}")
    if rank < 1 or n_in < 1:
        raise StrategyError(f"{key}: frozen A needs rank >= 1 and n_in >= 1, got {rank} x {n_in}")
    digest = hashlib.sha256(_FROZEN_A_TAG + key.encode("utf-8")).digest()
    seq = np.random.SeedSequence([int(seed), int.from_bytes(digest, "little")])
    raw = np.random.PCG64(seq).random_raw(rank * n_in)
    unit = (raw >> np.uint64(11)).astype(_F64) * (1.0 / 9007199254740992.0)  # [0, 1), as Generator.random
    bound = 1.0 / math.sqrt(n_in)
    return ((2.0 * unit - 1.0) * bound).astype(_F32).reshape(rank, n_in)


def frozen_lora_a_for(tensors_or_shapes: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """``frozen_lora_a`` for every ``lora_A`` key of an adapter, given its arrays or their shapes.

    The A keys must be listed (a B alone does not tell n_in): pass the bundle's template adapter.
    """
    out = {}
    for key, value in tensors_or_shapes.items():
        if not key.endswith(A_SUFFIX):
            continue
        shape = tuple(np.shape(value)) if isinstance(value, np.ndarray) else tuple(value)
        if len(shape) != 2:
            raise StrategyError(f"{key}: lora_A must be 2-D [r, n_in], got shape {shape}")
        out[key] = frozen_lora_a(seed, key, int(shape[0]), int(shape[1]))
    return out


def with_frozen_a(tensors: Tensors, frozen_a: Tensors) -> dict[str, np.ndarray]:
    """An FFA upload completed with the fleet's frozen A (no copies): every pair gets its A.

    An A the upload does carry must equal the frozen one, else ``StrategyError``: that box trained A
    or used another seed, and its B does not belong to this fleet's A.
    """
    out = dict(tensors)
    for a_key, b_key in split_keys(tensors).pairs.values():
        if a_key not in frozen_a:
            if a_key in tensors:
                continue
            raise StrategyError(f"{b_key}: no frozen A for {a_key}")
        ref = frozen_a[a_key]
        if a_key in tensors:
            if not same_array(tensors[a_key], ref):
                raise StrategyError(f"{a_key}: differs from the fleet's frozen A (trained A or wrong seed)")
        else:
            out[a_key] = ref
    return out


def check_update(tensors: Tensors, like: Mapping[str, Any] | None = None) -> None:
    """Check one upload before it is accepted: float arrays, finite, well-formed pairs, and, given
    ``like`` (the expected tensors or shapes), the same keys and shapes. Raises ``StrategyError``."""
    split = split_keys(tensors)
    for key, value in tensors.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise StrategyError(f"{key}: expected a float array, got {type(value).__name__}")
        if not np.isfinite(value).all():
            raise StrategyError(f"{key}: non-finite values")
    for prefix, (a_key, b_key) in split.pairs.items():
        if a_key in tensors:
            pair_arrays(tensors, prefix, a_key, b_key)
    if like is not None:
        missing, extra = sorted(set(like) - set(tensors)), sorted(set(tensors) - set(like))
        if missing or extra:
            raise StrategyError(
                f"keys differ from the expected ones: missing {missing[:3]}, extra {extra[:3]}"
            )
        for key, value in tensors.items():
            want = like[key]
            want_shape = tuple(want.shape) if isinstance(want, np.ndarray) else tuple(want)
            if value.shape != want_shape:
                raise StrategyError(f"{key}: shape {value.shape}, expected {want_shape}")
