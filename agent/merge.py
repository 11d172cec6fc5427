"""Fold a LoRA adapter into the base weights: a serving graph without LoRA branches.

A LoRA branch costs two small MatMuls and an Add per projection on every request, though the
adapter changes only at a promotion. ``merged_model`` takes the bundle's fp32 graph (its weights are
``base.safetensors``'s, checked against torch when the bundle was built), folds each branch into its
projection, ``W + A·B`` (the adapter file already carries ``A = A_peftᵀ`` and ``B = (α/r)·B_peftᵀ``,
so this is ``W + (α/r)·(B_peft·A_peft)ᵀ`` in the graph's [in, out] layout), removes the branches and
the LoRA inputs, bakes the adapter's head in, and for INT8 quantizes every projection again, per
output channel, from the merged fp32 weights (never from INT8 weights).

INT8 that agrees with fp32: ``DynamicQuantizeMatMul`` quantizes its input per tensor at run time,
so a few outlier channels of an activation (BERT's LayerNorm outputs have them) set the step for
all the others. ``QuantRecipe.smooth_alpha`` moves that range into the weights (SmoothQuant,
Xiao et al. 2023): ``x·W = (x/s)·(s·W)`` with ``s_k = max|x_k|^α / max|W_k|^(1-α)`` per input
channel ``k``, ``max|x_k|`` calibrated on the plant's own texts. Where the input is the attention
core's output, ``1/s`` folds exactly into the value projection (the attention output is linear in
V); elsewhere a ``Mul`` divides the activation. Projections named in ``keep_fp32`` stay fp32.

Pure graph work on ``onnx`` protos and numpy: no session here (the engine builds and verifies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.lora_graph import HEAD_BIAS, HEAD_NODE, HEAD_WEIGHT

LORA_ADD_SUFFIX = ".lora_add"
QUANT_DOMAIN = "com.microsoft"


class MergeError(ValueError):
    """The graph or the adapter does not fit the merge (the engine keeps serving the LoRA path)."""


class MergeCancelled(Exception):
    """A newer adapter replaced the one being merged."""


@dataclass(frozen=True)
class QuantRecipe:
    """How the merged graph is quantized to INT8."""

    smooth_alpha: float | None = 0.5  # None: no smoothing
    # Projections kept fp32, by kind ("qkv", "attention_output", "intermediate", "output") or
    # "layer{l}.{kind}".
    keep_fp32: frozenset[str] = field(default_factory=frozenset)
    # Smoothing is applied to these kinds only (the attention output's is free, the others cost a Mul).
    smooth_kinds: frozenset[str] = frozenset({"qkv", "attention_output", "intermediate", "output"})
    # Outlier channels (LLM.int8()'s decomposition): input channels whose calibrated max |x| is
    # above ``outlier_ratio`` x the median channel's are computed in fp32 beside the INT8 product,
    # at most ``max_outliers`` per projection, for these kinds.
    outlier_kinds: frozenset[str] = frozenset()
    outlier_ratio: float = 6.0
    max_outliers: int = 8
    # "split": the outlier channels' product in fp32 (exact, but a Gather and a MatMul more);
    # "scale": divide only those channels down to ``outlier_ratio`` x the median (their weight rows
    # take the factor: SmoothQuant on the outliers alone, one Mul).
    outlier_mode: str = "split"

    def describe(self) -> dict[str, object]:
        return {
            "method": "dynamic per-tensor activations, per-channel symmetric weights",
            "smooth_alpha": self.smooth_alpha,
            "smooth_kinds": sorted(self.smooth_kinds) if self.smooth_alpha is not None else [],
            "outlier_kinds": sorted(self.outlier_kinds),
            "outlier_mode": self.outlier_mode if self.outlier_kinds else None,
            "keep_fp32": sorted(self.keep_fp32),
        }


# Tried in turn on each box's own texts; the engine keeps the one closest to fp32. First: SmoothQuant
# (alpha 0.5) on the projections fed by LayerNorm outputs and the attention core, and on the FFN-out
# input (GELU output: a handful of channels 10-17x the median one) only those outlier channels
# scaled down to 3x the median, with their weight rows taking the factor. Smoothing every GELU
# channel made all-MiniLM-L6-v2 agree less; computing the outliers in fp32 beside the INT8 product
# ("split") was closest to fp32 but ~20 % slower on stream batches (README: what limits the misses).
# Second: plain per-channel INT8, for graphs where smoothing does not pay (the tiny test BERT).
_NOT_FFN_OUT = frozenset({"qkv", "attention_output", "intermediate"})
INT8_RECIPES: tuple[QuantRecipe, ...] = (
    QuantRecipe(
        smooth_alpha=0.5,
        smooth_kinds=_NOT_FFN_OUT,
        outlier_kinds=frozenset({"output"}),
        outlier_ratio=3.0,
        max_outliers=16,
        outlier_mode="scale",
    ),
    QuantRecipe(smooth_alpha=None),
)


@dataclass(frozen=True)
class Projection:
    """A base projection of the merged graph: ``MatMul(x, W)`` with W an initializer."""

    key: str  # "layer{l}.{kind}", kind one of qkv / attention_output / intermediate / output
    node: str  # MatMul node name
    input: str  # activation tensor name
    weight: str  # initializer name

    @property
    def kind(self) -> str:
        return self.key.split(".", 1)[1]


@dataclass
class MergedGraph:
    model: onnx.ModelProto
    projections: list[Projection]
    folded: list[str]  # branch keys that carried adapter factors


def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise MergeCancelled()


def fold_adapter(
    fp32: onnx.ModelProto, arrays: Mapping[str, np.ndarray], cancel: Callable[[], bool] | None = None
) -> MergedGraph:
    """Fold ``arrays`` (graph-input name -> value, as ``agent.adapters.to_ort_arrays`` gives) into
    ``fp32`` in place: no LoRA branch, no LoRA input, the head baked in.

    Targets the adapter does not train keep their base weight. Raises ``MergeError`` for a graph
    without the branches of ``agent.lora_graph`` or a factor whose shapes do not fit.
    """
    g = fp32.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    by_name = {n.name: n for n in g.node}
    adds = [n for n in g.node if n.op_type == "Add" and n.name.endswith(LORA_ADD_SUFFIX)]
    if not adds:
        raise MergeError("the graph has no LoRA branches (was it built by `edge-agent model build`?)")
    drop: set[str] = set()
    lora_inputs: set[str] = set()
    projections: list[Projection] = []
    folded: list[str] = []
    for add in adds:
        _check(cancel)
        key = add.name[: -len(LORA_ADD_SUFFIX)]
        if "." not in key:  # the packed q/k/v branch is named "layer{l}"
            key = f"{key}.qkv"
        prefix = add.name[: -len(LORA_ADD_SUFFIX)]
        lora_a, lora_b = by_name.get(f"{prefix}.lora_a"), by_name.get(f"{prefix}.lora_b")
        base = producer.get(add.input[0])
        if lora_a is None or lora_b is None or base is None or base.op_type != "MatMul" or not base.name:
            raise MergeError(f"LoRA branch {prefix}: unexpected graph structure")
        a_name, b_name = lora_a.input[1], lora_b.input[1]
        w_name = base.input[1]
        if w_name not in inits:
            raise MergeError(f"LoRA branch {prefix}: base weight {w_name} is not an initializer")
        lora_inputs |= {a_name, b_name}
        if a_name in arrays or b_name in arrays:
            if a_name not in arrays or b_name not in arrays:
                raise MergeError(f"LoRA branch {prefix}: adapter carries only one of {a_name}, {b_name}")
            w = numpy_helper.to_array(inits[w_name])
            a, b = np.asarray(arrays[a_name], np.float32), np.asarray(arrays[b_name], np.float32)
            if (
                a.ndim != 2
                or b.ndim != 2
                or a.shape[0] != w.shape[0]
                or b.shape[1] != w.shape[1]
                or (a.shape[1] != b.shape[0])
            ):
                raise MergeError(f"LoRA branch {prefix}: A{a.shape} B{b.shape} do not fit W{w.shape}")
            merged = (w.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
            inits[w_name].CopyFrom(numpy_helper.from_array(merged, w_name))
            folded.append(key)
        base.output[0] = add.output[0]
        drop |= {add.name, lora_a.name, lora_b.name}
        projections.append(Projection(key, base.name, base.input[0], w_name))
    kept = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(kept)
    unknown = set(arrays) - lora_inputs - {HEAD_WEIGHT, HEAD_BIAS}
    if unknown:
        raise MergeError(f"adapter tensors {sorted(unknown)[:3]} are not LoRA inputs of this graph")
    # The head: the adapter's values become constants (ORT then folds the Transpose away).
    for name in (HEAD_WEIGHT, HEAD_BIAS):
        if name in arrays:
            inits[name].CopyFrom(numpy_helper.from_array(np.asarray(arrays[name], np.float32), name))
    constant = lora_inputs | {HEAD_WEIGHT, HEAD_BIAS}
    keep_inputs = [i for i in g.input if i.name not in constant]
    del g.input[:]
    g.input.extend(keep_inputs)
    keep_inits = [t for t in g.initializer if t.name not in lora_inputs]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    projections.sort(key=lambda p: _order(p.key))
    return MergedGraph(fp32, projections, folded)


_KIND_ORDER = {"qkv": 0, "attention_output": 1, "intermediate": 2, "output": 3}


def _order(key: str) -> tuple[int, int]:
    layer, kind = key.split(".", 1)
    return int(layer.removeprefix("layer")), _KIND_ORDER.get(kind, 9)


def calibration_outputs(merged: MergedGraph) -> list[str]:
    """Activation tensors whose per-channel ranges smoothing needs (projection inputs, deduplicated)."""
    return list(dict.fromkeys(p.input for p in merged.projections))


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (fp32 tensors of any shape), for calibration."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def channel_absmax(activation: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """max |x| per last-axis channel over the real (unpadded) tokens of a [batch, seq, C] activation."""
    x = np.abs(activation.reshape(-1, activation.shape[-1]))
    if mask is not None and activation.ndim == 3:
        x = x[mask.reshape(-1).astype(bool)]
    return x.max(axis=0) if len(x) else np.zeros(activation.shape[-1], np.float32)


def smoothing_factors(x_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s`` for ``x·W = (x/s)·(s·W)`` (W is [in, out])."""
    w_absmax = np.abs(w).max(axis=1)
    eps = 1e-5
    s = np.power(np.maximum(x_absmax, eps), alpha) / np.power(np.maximum(w_absmax, eps), 1.0 - alpha)
    s = np.where((x_absmax > eps) & (w_absmax > eps), s, 1.0)
    return s.astype(np.float32)


def outlier_channels(x_absmax: np.ndarray, ratio: float, limit: int) -> np.ndarray:
    """Input channels whose max |x| exceeds ``ratio`` x the median channel's, largest first, at most ``limit``."""
    median = float(np.median(x_absmax))
    if median <= 0 or limit <= 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-x_absmax, kind="stable")[:limit]
    return np.sort(order[x_absmax[order] > ratio * median]).astype(np.int64)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric signed INT8 per output channel (columns of a [in, out] weight), as ORT's quantizer."""
    absmax = np.abs(w).max(axis=0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale, np.zeros(w.shape[1], np.int8)


def quantize_int8(
    merged: MergedGraph,
    recipe: QuantRecipe,
    x_absmax: Mapping[str, np.ndarray] | None = None,
    cancel: Callable[[], bool] | None = None,
    keep_weights_fp32: bool = False,
) -> dict[str, Any]:
    """Turn every projection of ``merged`` (in place) into ``DynamicQuantizeMatMul`` on INT8 weights.

    ``x_absmax``: per-channel max |x| of each projection input (``calibration_outputs``), needed
    when ``recipe.smooth_alpha`` or ``recipe.outlier_kinds`` is set. ``keep_weights_fp32`` applies the smoothing but keeps the
    (rescaled) fp32 ``MatMul``s: the function must not change (a test of the rewrite). Returns
    what was done, for the engine's stats.
    """
    g = merged.model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    if (recipe.smooth_alpha is not None or recipe.outlier_kinds) and x_absmax is None:
        raise MergeError("smoothing and outlier channels need calibrated activation ranges")
    value_fold = _value_fold_targets(g, merged.projections)
    smooth = recipe.smooth_alpha is not None and x_absmax is not None

    def skipped(p: Projection) -> bool:
        return p.kind in recipe.keep_fp32 or p.key in recipe.keep_fp32

    # The value projection is scaled first: the qkv weight it changes is quantized afterwards.
    folded_s: dict[str, np.ndarray] = {}
    for p in merged.projections:
        fold = value_fold.get(p.key)
        if smooth and fold is not None and p.kind in recipe.smooth_kinds and not skipped(p):
            assert x_absmax is not None and recipe.smooth_alpha is not None
            w = numpy_helper.to_array(inits[p.weight])
            s = smoothing_factors(x_absmax[p.input], w, recipe.smooth_alpha)
            _scale_value_projection(inits, fold, 1.0 / s)
            folded_s[p.key] = s
    inserted: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
    appended: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert after it
    quantized, kept, smoothed, outliers = [], [], [], {}
    for p in merged.projections:
        _check(cancel)
        if skipped(p):
            kept.append(p.key)
            continue
        node = nodes[p.node]
        w = numpy_helper.to_array(inits[p.weight]).astype(np.float32)
        x_in = p.input
        if p.key in folded_s:
            w = w * folded_s[p.key][:, None]
            smoothed.append(p.key)
        else:
            scale_in = np.ones(w.shape[0], np.float32)
            if smooth and p.kind in recipe.smooth_kinds:
                assert x_absmax is not None and recipe.smooth_alpha is not None
                s = smoothing_factors(x_absmax[p.input], w, recipe.smooth_alpha)
                w = w * s[:, None]
                scale_in = (1.0 / s).astype(np.float32)
                smoothed.append(p.key)
            picked = (
                outlier_channels(x_absmax[p.input], recipe.outlier_ratio, recipe.max_outliers)
                if x_absmax is not None and p.kind in recipe.outlier_kinds
                else np.zeros(0, np.int64)
            )
            if len(picked) and recipe.outlier_mode == "scale":
                assert x_absmax is not None
                target = recipe.outlier_ratio * float(np.median(x_absmax[p.input]))
                factor = np.ones(w.shape[0], np.float32)
                factor[picked] = np.maximum(x_absmax[p.input][picked] * scale_in[picked] / target, 1.0)
                w = w * factor[:, None]
                scale_in = (scale_in / factor).astype(np.float32)
                outliers[p.key] = picked.tolist()
            elif len(picked):
                # y = Q(x·m)·Q(W') + x[:, O]·W[O, :]: the outlier channels leave the INT8 product
                # (m zeroes them, so they no longer set the activation's quantization step).
                w_out = numpy_helper.to_array(inits[p.weight]).astype(np.float32)[picked]
                scale_in = scale_in.copy()
                scale_in[picked] = 0.0
                w = w.copy()
                w[picked] = 0.0
                idx, wo = f"{p.node}.outlier_idx", f"{p.node}.outlier_w"
                xo, yo, ym = f"{p.node}.outlier_x", f"{p.node}.outlier_y", f"{p.node}.int8_y"
                g.initializer.extend(
                    [
                        numpy_helper.from_array(picked.astype(np.int64), idx),
                        numpy_helper.from_array(w_out, wo),
                    ]
                )
                inserted.setdefault(p.node, []).extend(
                    [
                        helper.make_node(
                            "Gather", [p.input, idx], [xo], axis=-1, name=f"{p.node}.outlier_gather"
                        ),
                        helper.make_node("MatMul", [xo, wo], [yo], name=f"{p.node}.outlier_matmul"),
                    ]
                )
                appended.setdefault(p.node, []).append(
                    helper.make_node("Add", [ym, yo], [node.output[0]], name=f"{p.node}.outlier_add")
                )
                node.output[0] = ym
                outliers[p.key] = picked.tolist()
            if not np.all(scale_in == 1.0):
                inv = f"{p.node}.smooth_inv"
                g.initializer.append(numpy_helper.from_array(scale_in.astype(np.float32), inv))
                x_in = f"{p.node}.smoothed"
                inserted.setdefault(p.node, []).append(
                    helper.make_node("Mul", [p.input, inv], [x_in], name=f"{p.node}.smooth")
                )
        if keep_weights_fp32:
            inits[p.weight].CopyFrom(numpy_helper.from_array(w.astype(np.float32), p.weight))
            node.input[0] = x_in
            quantized.append(p.key)
            continue
        q, scale, zp = quantize_weight(w)
        qn, sn, zn = f"{p.weight}.q", f"{p.weight}.scale", f"{p.weight}.zp"
        g.initializer.extend(
            [
                numpy_helper.from_array(q, qn),
                numpy_helper.from_array(scale, sn),
                numpy_helper.from_array(zp, zn),
            ]
        )
        new = helper.make_node(
            "DynamicQuantizeMatMul",
            [x_in, qn, sn, zn],
            list(node.output),
            name=node.name,
            domain=QUANT_DOMAIN,
        )
        node.CopyFrom(new)
        quantized.append(p.key)
    if inserted or appended:
        out: list[onnx.NodeProto] = []
        for n in g.node:
            out.extend(inserted.get(n.name, []))
            out.append(n)
            out.extend(appended.get(n.name, []))
        del g.node[:]
        g.node.extend(out)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == QUANT_DOMAIN for o in merged.model.opset_import):
        merged.model.opset_import.append(helper.make_opsetid(QUANT_DOMAIN, 1))
    return {
        "quantized": quantized,
        "kept_fp32": kept,
        "smoothed": smoothed,
        "outlier_channels": outliers,
        **recipe.describe(),
    }


@dataclass(frozen=True)
class _ValueFold:
    qkv_weight: str  # the layer's packed q|k|v weight initializer [H, 3H]
    qkv_bias: str  # the attention core's bias [3H] (q|k|v)
    hidden: int


def _value_fold_targets(g: onnx.GraphProto, projections: list[Projection]) -> dict[str, _ValueFold]:
    """attention_output projections whose input is a MultiHeadAttention output fed by the layer's qkv
    MatMul: their smoothing divides the value projection instead of adding a Mul."""
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    by_key = {p.key: p for p in projections}
    out: dict[str, _ValueFold] = {}
    for p in projections:
        if p.kind != "attention_output":
            continue
        mha = producer.get(p.input)
        qkv = by_key.get(p.key.replace("attention_output", "qkv"))
        if mha is None or mha.op_type != "MultiHeadAttention" or qkv is None or len(mha.input) < 4:
            continue
        split = producer.get(mha.input[2])
        if split is None or split.op_type != "Split" or mha.input[3] not in inits:
            continue
        add_or_mm = producer.get(split.input[0])
        # The qkv MatMul feeds the Split directly once the LoRA Add is folded.
        if add_or_mm is None or add_or_mm.name != qkv.node or split.output[2] != mha.input[2]:
            continue
        hidden = int(next(t for t in g.initializer if t.name == qkv.weight).dims[1]) // 3
        out[p.key] = _ValueFold(qkv.weight, mha.input[3], hidden)
    return out


def _scale_value_projection(inits: dict[str, onnx.TensorProto], fold: _ValueFold, c: np.ndarray) -> None:
    h = fold.hidden
    w = numpy_helper.to_array(inits[fold.qkv_weight]).copy()
    b = numpy_helper.to_array(inits[fold.qkv_bias]).copy()
    w[:, 2 * h : 3 * h] *= c[None, :]
    b[2 * h : 3 * h] *= c
    inits[fold.qkv_weight].CopyFrom(numpy_helper.from_array(w.astype(np.float32), fold.qkv_weight))
    inits[fold.qkv_bias].CopyFrom(numpy_helper.from_array(b.astype(np.float32), fold.qkv_bias))


def head_node_name() -> str:
    return HEAD_NODE
