"""Graph surgery that puts LoRA branches into a fused BERT graph without breaking the fusion.

ONNX Runtime's transformer optimizer fuses each self-attention block into one ``Attention`` node
(packed Q/K/V projection + attention core). A LoRA ``Add`` after the q/v bias blocks that pattern
match (measured: no attention fusion at all), which costs about 2x on CPU and makes INT8 useless.
So we optimize the *plain* model first, then split every fused ``Attention`` node into

    qkv   = MatMul(x, W_qkv)                      # quantizable, like any base weight
    delta = MatMul(MatMul(x, A_l), B_l)           # LoRA, fp32, A_l [H, R], B_l [R, 3H]
    q,k,v = Split(qkv + delta)
    out   = MultiHeadAttention(q, k, v, bias, key_padding_mask)   # fused attention core

``A_l``/``B_l`` are graph inputs backed by zero-size initializers, so without an adapter the
branch adds an empty product (bit-identical base output) and ONNX Runtime's LoRA API can override
them per run. Packing q/k/v into one ``B_l`` keeps one branch per layer; the adapter converter puts
each target's factor in its column block (see ``agent.adapters``). The classifier head becomes an
overridable input too, with a dynamic label dimension, because each box's task lives in its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
HEAD_NODE = "head"
HEAD_NODES = ("head.transpose", HEAD_NODE, "head.add")
POOLED_OUTPUT = "pooled"


def lora_input_names(layer: int) -> tuple[str, str]:
    """Graph input names of layer ``layer``'s packed q/k/v LoRA factors."""
    return f"lora.{layer}.qkv.A", f"lora.{layer}.qkv.B"


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


def add_lora_and_head_inputs(model: onnx.ModelProto, hidden_size: int, num_layers: int) -> LoraGraphInfo:
    """Rewrite a fused BERT graph in place: LoRA branch per layer, overridable head, pooled output."""
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
    layer = 0
    for node in g.node:
        if node.op_type != "Attention":
            new_nodes.append(node)
            continue
        x, w_qkv, bias = node.input[0], node.input[1], node.input[2]
        num_heads = _attr(node, "num_heads")
        a_name, b_name = lora_input_names(layer)
        g.initializer.append(numpy_helper.from_array(np.zeros((h, 0), np.float32), a_name))
        g.initializer.append(numpy_helper.from_array(np.zeros((0, 3 * h), np.float32), b_name))
        g.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [h, "r"]))
        g.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, ["r", 3 * h]))
        lora_inputs[a_name] = [h, "r"]
        lora_inputs[b_name] = ["r", 3 * h]
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
        layer += 1
    del g.node[:]
    g.node.extend(new_nodes)
    head = _make_head_overridable(model, h)
    return LoraGraphInfo(num_layers, h, lora_inputs, lora_nodes, head)


def _make_head_overridable(model: onnx.ModelProto, hidden_size: int) -> str:
    g = model.graph
    logits = g.output[0].name
    head = next((n for n in g.node if logits in n.output and n.op_type == "Gemm"), None)
    if head is None or len(head.input) < 3:
        raise GraphSurgeryError("no Gemm classifier head produces the logits output")
    inits = {t.name: t for t in g.initializer}
    w, b = inits[head.input[1]], inits[head.input[2]]
    trans_b = any(a.name == "transB" and a.i == 1 for a in head.attribute)
    if not trans_b:
        raise GraphSurgeryError("classifier Gemm without transB: unexpected exporter output")
    # Copies, not renames: exporters share one initializer between equal tensors (a zero bias).
    g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w), HEAD_WEIGHT))
    g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(b), HEAD_BIAS))
    # Gemm would be rewritten by the INT8 quantizer into MatMul on a *transposed copy* of the
    # weight, dropping the overridable input; an explicit Transpose keeps it a graph input.
    pooled_in, logits_out = head.input[0], head.output[0]
    replacement = [
        helper.make_node("Transpose", [HEAD_WEIGHT], ["head.weight_t"], perm=[1, 0], name="head.transpose"),
        helper.make_node("MatMul", [pooled_in, "head.weight_t"], ["head.matmul_out"], name=HEAD_NODE),
        helper.make_node("Add", ["head.matmul_out", HEAD_BIAS], [logits_out], name="head.add"),
    ]
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        nodes.extend(replacement if n is head or n == head else [n])
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(HEAD_WEIGHT, TensorProto.FLOAT, ["num_labels", hidden_size]))
    g.input.append(helper.make_tensor_value_info(HEAD_BIAS, TensorProto.FLOAT, ["num_labels"]))
    # The head's input is the pooled sentence vector: exposing it costs nothing and gives the
    # learner and drift detection an embedding without a second model. Renamed at its producer
    # (an Identity on a graph output trips ORT's identity elimination).
    for n in g.node:
        for i, name in enumerate(n.output):
            if name == pooled_in:
                n.output[i] = POOLED_OUTPUT
        for i, name in enumerate(n.input):
            if name == pooled_in:
                n.input[i] = POOLED_OUTPUT
    g.output[0].CopyFrom(helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "num_labels"]))
    g.output.append(helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, ["batch", hidden_size]))
    return HEAD_NODE


def drop_initializer_value_info(model: onnx.ModelProto) -> None:
    """Exporters write value_info for initializers; the quantizer's shape inference trips over it."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [v for v in g.value_info if v.name not in inits]
    del g.value_info[:]
    g.value_info.extend(keep)
