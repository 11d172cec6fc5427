"""Graph surgery that puts LoRA branches into a fused BERT graph without breaking the fusion.

ONNX Runtime's transformer optimizer fuses each self-attention block into one ``Attention`` node
(packed Q/K/V projection + attention core). A LoRA ``Add`` after the q/v bias blocks that pattern
match (measured: no attention fusion at all), which costs about 2x on CPU and makes INT8 useless.
So we optimize the *plain* model first, then split every fused ``Attention`` node into

    qkv   = MatMul(x, W_qkv)                      # quantizable, like any base weight
    delta = MatMul(MatMul(x, A_l), B_l)           # LoRA, fp32, A_l [H, R], B_l [R, 3H]
    q,k,v = Split(qkv + delta)
    out   = MultiHeadAttention(q, k, v, bias, key_padding_mask)   # fused attention core

The three dense projections after attention (attention output, FFN in, FFN out) are plain
``MatMul`` nodes feeding ``SkipLayerNormalization``/``BiasGelu``; each gets its own branch

    y = MatMul(x, W) + MatMul(MatMul(x, A), B)

LoRA on all projections, not only q/v, is what lets an adapter match a full fine-tune on plant
texts (the learning benchmark: 2-3 points before drift, 6 points under drift).

``A``/``B`` are graph inputs backed by zero-size initializers, so without an adapter a branch
adds an empty product (bit-identical base output) and ONNX Runtime's LoRA API can override them
per run; an adapter that trains fewer targets leaves the other branches at their empty default.
Packing q/k/v into one ``B_l`` keeps one attention branch per layer; the adapter converter puts
each target's factor in its column block (see ``agent.adapters``). The classifier head becomes an
overridable input too, with a dynamic label dimension, because each box's task lives in its adapter.
Each branch's rank is its own symbolic dimension (``r_qkv``, ``r_output``...): ONNX Runtime's
memory planner may treat equally named dimensions as equal sizes, and the ranks differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
HEAD_NODE = "head"
HEAD_NODES = ("head.transpose", HEAD_NODE, "head.add")
POOLED_OUTPUT = "pooled"


QKV_BRANCH = "qkv"
# LoRA targets that are a dense projection of their own, in the order they run in a layer.
DENSE_TARGETS = ("attention_output", "intermediate", "output")


def lora_input_names(layer: int, branch: str = QKV_BRANCH) -> tuple[str, str]:
    """Graph input names of a layer's LoRA factors: ``branch`` is "qkv" or one of ``DENSE_TARGETS``."""
    return f"lora.{layer}.{branch}.A", f"lora.{layer}.{branch}.B"


@dataclass(frozen=True)
class LoraGraphInfo:
    num_layers: int
    hidden_size: int
    lora_inputs: dict[str, list[int | str]]  # name -> shape, "r" marks the dynamic rank
    lora_matmul_nodes: list[str]  # excluded from quantization: LoRA factors must stay fp32 inputs
    head_node: str


class GraphSurgeryError(ValueError):
    """The exported graph does not have the shape this surgery expects."""


def _attr(node: onnx.NodeProto, name: str) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    raise GraphSurgeryError(f"{node.name}: attribute {name} missing")


def add_lora_and_head_inputs(
    model: onnx.ModelProto,
    hidden_size: int,
    num_layers: int,
    dense_targets: Sequence[str] = DENSE_TARGETS,
    per_token: bool = False,
) -> LoraGraphInfo:
    """Rewrite a fused BERT graph in place: LoRA branches per layer, overridable head, pooled output.

    The packed q/k/v branch is always there (splitting the fused attention needs it anyway);
    ``dense_targets`` chooses which dense projections get one: each costs three small nodes per
    layer, which shows at batch 1 (LoRA overhead in the README's figures). ``per_token``: the head
    is a token-classification head (logits per token; no pooled output).
    """
    g = model.graph
    attention = [n for n in g.node if n.op_type == "Attention"]
    if len(attention) != num_layers:
        raise GraphSurgeryError(
            f"expected {num_layers} fused Attention nodes, found {len(attention)}: "
            "the transformer optimizer did not recognise this architecture"
        )
    h = hidden_size
    split_sizes = "lora.qkv_split"
    g.initializer.append(numpy_helper.from_array(np.array([h, h, h], np.int64), split_sizes))
    # The key padding mask comes straight from the request, so any padding side works.
    mask_i32 = "attention_mask_int32"
    new_nodes: list[onnx.NodeProto] = [
        helper.make_node("Cast", ["attention_mask"], [mask_i32], to=TensorProto.INT32, name="lora_mask_cast")
    ]
    lora_inputs: dict[str, list[int | str]] = {}
    lora_nodes: list[str] = []
    mha_outputs: list[str] = []
    layer = 0
    for node in g.node:
        if node.op_type != "Attention":
            new_nodes.append(node)
            continue
        x, w_qkv, bias = node.input[0], node.input[1], node.input[2]
        num_heads = _attr(node, "num_heads")
        a_name, b_name = _add_factor_inputs(g, lora_inputs, layer, QKV_BRANCH, h, 3 * h)
        p = f"layer{layer}"
        new_nodes += [
            helper.make_node("MatMul", [x, w_qkv], [f"{p}.qkv"], name=f"{p}.qkv_matmul"),
            helper.make_node("MatMul", [x, a_name], [f"{p}.xa"], name=f"{p}.lora_a"),
            helper.make_node("MatMul", [f"{p}.xa", b_name], [f"{p}.xab"], name=f"{p}.lora_b"),
            helper.make_node("Add", [f"{p}.qkv", f"{p}.xab"], [f"{p}.qkv_lora"], name=f"{p}.lora_add"),
            helper.make_node(
                "Split",
                [f"{p}.qkv_lora", split_sizes],
                [f"{p}.q", f"{p}.k", f"{p}.v"],
                axis=2,
                name=f"{p}.split",
            ),
            helper.make_node(
                "MultiHeadAttention",
                [f"{p}.q", f"{p}.k", f"{p}.v", bias, mask_i32],
                [node.output[0]],
                domain="com.microsoft",
                num_heads=num_heads,
                name=f"{p}.mha",
            ),
        ]
        lora_nodes += [f"{p}.lora_a", f"{p}.lora_b"]
        mha_outputs.append(node.output[0])
        layer += 1
    del g.node[:]
    g.node.extend(new_nodes)
    unknown = set(dense_targets) - set(DENSE_TARGETS)
    if unknown:
        raise GraphSurgeryError(f"unknown dense LoRA targets {sorted(unknown)}; known: {list(DENSE_TARGETS)}")
    if dense_targets:
        lora_nodes += _add_dense_branches(g, mha_outputs, lora_inputs, dense_targets)
    head = _make_head_overridable(model, h, per_token)
    return LoraGraphInfo(num_layers, h, lora_inputs, lora_nodes, head)


def _add_factor_inputs(
    g: onnx.GraphProto,
    lora_inputs: dict[str, list[int | str]],
    layer: int,
    branch: str,
    n_in: int,
    n_out: int,
) -> tuple[str, str]:
    """Graph inputs A [n_in, r] and B [r, n_out], defaulting to zero-size (rank 0) initializers."""
    a_name, b_name = lora_input_names(layer, branch)
    rank = f"r_{branch}"
    g.initializer.append(numpy_helper.from_array(np.zeros((n_in, 0), np.float32), a_name))
    g.initializer.append(numpy_helper.from_array(np.zeros((0, n_out), np.float32), b_name))
    g.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [n_in, rank]))
    g.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, n_out]))
    lora_inputs[a_name] = [n_in, rank]
    lora_inputs[b_name] = [rank, n_out]
    return a_name, b_name


def _add_dense_branches(
    g: onnx.GraphProto,
    mha_outputs: list[str],
    lora_inputs: dict[str, list[int | str]],
    targets: Sequence[str],
) -> list[str]:
    """A LoRA branch on each layer's attention-output, FFN-in and FFN-out ``MatMul``.

    The projections are found by structure, not by exporter node names: attention output is the
    ``MatMul`` reading the attention core's output, FFN-in the ``MatMul`` reading the following
    ``SkipLayerNormalization``, FFN-out the ``MatMul`` reading FFN-in's activation.
    """
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def next_node(tensor: str, op_types: tuple[str, ...], what: str) -> onnx.NodeProto:
        found = [n for n in consumers.get(tensor, []) if n.op_type in op_types]
        if op_types == ("MatMul",):
            found = [n for n in found if n.input[0] == tensor and n.input[1] in inits]
        if len(found) != 1:
            raise GraphSurgeryError(
                f"{what}: expected one {'/'.join(op_types)} reading {tensor}, found {len(found)}"
            )
        return found[0]

    # Keyed by the MatMul's (renamed) output: node names may be empty, tensor names are unique.
    branches: dict[str, list[onnx.NodeProto]] = {}
    lora_nodes: list[str] = []
    for layer, attn_core in enumerate(mha_outputs):
        attn_out = next_node(attn_core, ("MatMul",), f"layer {layer} attention output")
        norm = next_node(attn_out.output[0], ("SkipLayerNormalization",), f"layer {layer} attention norm")
        ffn_in = next_node(norm.output[0], ("MatMul",), f"layer {layer} FFN in")
        act = next_node(ffn_in.output[0], ("BiasGelu", "Gelu", "FastGelu"), f"layer {layer} FFN activation")
        ffn_out = next_node(act.output[0], ("MatMul",), f"layer {layer} FFN out")
        for target, mm in zip(DENSE_TARGETS, (attn_out, ffn_in, ffn_out), strict=True):
            if target not in targets:
                continue
            n_in, n_out = (int(d) for d in inits[mm.input[1]].dims)
            a_name, b_name = _add_factor_inputs(g, lora_inputs, layer, target, n_in, n_out)
            p, y = f"layer{layer}.{target}", mm.output[0]
            mm.output[0] = f"{p}.base"
            branches[mm.output[0]] = [
                helper.make_node("MatMul", [mm.input[0], a_name], [f"{p}.xa"], name=f"{p}.lora_a"),
                helper.make_node("MatMul", [f"{p}.xa", b_name], [f"{p}.xab"], name=f"{p}.lora_b"),
                helper.make_node("Add", [f"{p}.base", f"{p}.xab"], [y], name=f"{p}.lora_add"),
            ]
            lora_nodes += [f"{p}.lora_a", f"{p}.lora_b"]
    # Each branch right after its MatMul keeps the node list topologically sorted.
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        nodes.append(n)
        nodes.extend(branches.get(n.output[0], []) if n.output else [])
    del g.node[:]
    g.node.extend(nodes)
    return lora_nodes


def _head_nodes(g: onnx.GraphProto, logits: str) -> tuple[list[onnx.NodeProto], str, Any, Any]:
    """The exporter's classifier: (nodes to replace, their input, weight [L, H], bias [L]).

    A sequence head is a Gemm on the pooled vector (transB: weight [L, H]); a token head, a Linear
    on every token's hidden state, exports as MatMul on a pre-transposed weight [H, L] plus Add."""
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    head = producer.get(logits)
    if head is not None and head.op_type == "Gemm" and len(head.input) >= 3:
        if not any(a.name == "transB" and a.i == 1 for a in head.attribute):
            raise GraphSurgeryError("classifier Gemm without transB: unexpected exporter output")
        w, b = numpy_helper.to_array(inits[head.input[1]]), numpy_helper.to_array(inits[head.input[2]])
        return [head], head.input[0], w, b
    if head is not None and head.op_type == "Add":
        bias_name = next((i for i in head.input if i in inits), None)
        matmul = next(
            (producer[i] for i in head.input if i in producer and producer[i].op_type == "MatMul"), None
        )
        if bias_name is not None and matmul is not None and matmul.input[1] in inits:
            w_t = numpy_helper.to_array(inits[matmul.input[1]])
            return [matmul, head], matmul.input[0], w_t.T.copy(), numpy_helper.to_array(inits[bias_name])
    raise GraphSurgeryError("no Gemm or MatMul+Add classifier head produces the logits output")


def _make_head_overridable(model: onnx.ModelProto, hidden_size: int, per_token: bool = False) -> str:
    g = model.graph
    logits = g.output[0].name
    old, head_in, w, b = _head_nodes(g, logits)
    # Copies, not renames: exporters share one initializer between equal tensors (a zero bias).
    g.initializer.append(numpy_helper.from_array(w, HEAD_WEIGHT))
    g.initializer.append(numpy_helper.from_array(b, HEAD_BIAS))
    # Gemm would be rewritten by the INT8 quantizer into MatMul on a *transposed copy* of the
    # weight, dropping the overridable input; an explicit Transpose keeps it a graph input.
    replacement = [
        helper.make_node("Transpose", [HEAD_WEIGHT], ["head.weight_t"], perm=[1, 0], name="head.transpose"),
        helper.make_node("MatMul", [head_in, "head.weight_t"], ["head.matmul_out"], name=HEAD_NODE),
        helper.make_node("Add", ["head.matmul_out", HEAD_BIAS], [logits], name="head.add"),
    ]
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n is old[-1]:
            nodes.extend(replacement)
        elif not any(n is o for o in old):
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(HEAD_WEIGHT, TensorProto.FLOAT, ["num_labels", hidden_size]))
    g.input.append(helper.make_tensor_value_info(HEAD_BIAS, TensorProto.FLOAT, ["num_labels"]))
    lead = ["batch", "seq"] if per_token else ["batch"]
    g.output[0].CopyFrom(helper.make_tensor_value_info(logits, TensorProto.FLOAT, [*lead, "num_labels"]))
    if per_token:
        return HEAD_NODE
    # The head's input is the pooled sentence vector: exposing it costs nothing and gives the
    # learner and drift detection an embedding without a second model. Renamed at its producer
    # (an Identity on a graph output trips ORT's identity elimination).
    for n in g.node:
        for i, name in enumerate(n.output):
            if name == head_in:
                n.output[i] = POOLED_OUTPUT
        for i, name in enumerate(n.input):
            if name == head_in:
                n.input[i] = POOLED_OUTPUT
    g.output.append(helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, ["batch", hidden_size]))
    return HEAD_NODE


def drop_initializer_value_info(model: onnx.ModelProto) -> None:
    """Exporters write value_info for initializers; the quantizer's shape inference trips over it."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [v for v in g.value_info if v.name not in inits]
    del g.value_info[:]
    g.value_info.extend(keep)
