"""Federation test helpers: an hq.toml, uploads as a box would send them, reading what HQ publishes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import load_manifest
from agent.fed import lora_tensors, strategies
from agent.fed.protocol import UploadMeta
from agent.fed.spec import AdapterSpec
from agent.fed.wire import split_blob, tensors_to_bytes
from tests.integration.mosquitto import Mosquitto

FLEET = "f1"
SEED = 7


def write_hq_config(
    path: Path,
    broker: Mosquitto,
    bundle: Path,
    data_dir: Path,
    key: Path,
    worker: str = "hq-1",
    **rounds: Any,
) -> Path:
    settings = {"strategy": "ffa_lora", "min_uploads": 2, "duration_s": 600.0, "lora_seed": SEED, **rounds}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    path.write_text(
        f"""\
fleet = "{FLEET}"
data_dir = "{data_dir}"
bundle = "{bundle}"
signing_key_file = "{key}"
worker_id = "{worker}"
chunk_bytes = 4096

[broker]
host = "{broker.host}"
port = {broker.port}
keepalive_s = 5
reconnect_min_delay_s = 0.2
reconnect_max_delay_s = 1.0

[rounds]
{lines}
"""
    )
    return path


def fleet_section(public_key: Path, fleet: str = FLEET) -> str:
    return f'[fleet]\nid = "{fleet}"\npublic_key_files = ["{public_key}"]\nchunk_bytes = 4096\n'


def box_tensors(
    bundle: Path, seed: int, scale: float = 1.0, strategy: str = "ffa_lora"
) -> dict[str, np.ndarray]:
    """What a box trained in the fleet's mode would upload: random B and head (A frozen from SEED)."""
    spec = AdapterSpec.from_manifest(load_manifest(bundle))
    rng = np.random.default_rng(seed)
    full = {k: (rng.normal(0, 0.05, shape) * scale).astype(np.float32) for k, shape in spec.shapes.items()}
    full.update(lora_tensors.frozen_lora_a_for({k: spec.shapes[k] for k in spec.a_keys}, SEED))
    return strategies.upload_tensors(full, strategy)


def upload_frames(
    bundle: Path,
    device: str,
    tensors: dict[str, np.ndarray],
    *,
    upload_id: str,
    round_id: int | None = 1,
    num_examples: int = 100,
    strategy: str = "ffa_lora",
    chunk_bytes: int = 4096,
    base_hash: str | None = None,
    **meta: Any,
) -> list[bytes]:
    m = load_manifest(bundle)
    body = UploadMeta(
        fleet=FLEET,
        device=device,
        upload_id=upload_id,
        round=round_id,
        base_hash=base_hash or m.base_hash,
        strategy=strategy,
        adapter_version=f"{device}-{upload_id}",
        num_examples=num_examples,
        labels=list(m.labels),
        created=time.time(),
    ).model_dump()
    body.update(meta)
    return split_blob(upload_id, tensors_to_bytes(tensors), body, chunk_bytes)
