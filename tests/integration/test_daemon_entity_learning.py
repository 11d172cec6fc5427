"""Entity learning over MQTT: span samples in, a round trains LoRA + the per-token head in the
spawned learner, the gate compares entity F1, the engine hot-swaps, the spans it answers change."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.entities import span_f1
from tests.integration.conftest import write_agent_config
from tools.workorders import workorder_dataset

LEARNING = {
    "enabled": True,
    "min_new_samples": 530,  # of the ~540 that go to train (10 % to holdout)
    "min_interval_s": 0,
    "epochs": 8,
    "learning_rate": 1e-2,
    "max_cpu_percent": 100,
    "min_free_memory_mb": 0,
    "max_inference_p99_ms": 100000,
}
# One dataset (each seed draws its own site vocabularies): 600 samples to learn from, 40 to ask.
ORDERS = workorder_dataset(640, seed=0)
SAMPLES, PROBES = ORDERS[:600], ORDERS[600:]


@pytest.fixture(scope="module")
def learnable_token_bundle(tmp_path_factory) -> Path:
    """A tiny token bundle whose features a LoRA round can teach entities (tests.tiny)."""
    from tests.tiny import build_tiny_token_bundle

    return build_tiny_token_bundle(tmp_path_factory.mktemp("learnable-token"))


def ask(peer, rid: str) -> dict:
    peer.publish("entities/req", {"id": rid, "texts": [wo.text for wo in PROBES]})
    return peer.expect("entities/res", lambda m: m["id"] == rid, timeout=30).json


def f1_of(answer: dict) -> float:
    pred = [[(e["start"], e["end"], e["label"]) for e in spans] for spans in answer["entities"]]
    return span_f1([list(wo.entities) for wo in PROBES], pred)["f1"]


def test_span_samples_over_mqtt_train_promote_and_swap(
    tmp_path, broker, peer, learnable_token_bundle, start_agent
):
    config = write_agent_config(tmp_path / "agent.toml", broker, learnable_token_bundle, tmp_path / "data")
    agent = start_agent(config)
    peer.publish("config", {"version": 1, "learning": LEARNING}, retain=True)
    peer.expect("config/state", lambda m: m["status"] == "accepted" and m["version"] == 1)
    before = ask(peer, "q0")
    assert before["adapter_version"] is None

    for i, wo in enumerate(SAMPLES):
        entities = [{"start": s, "end": e, "label": lab} for s, e, lab in wo.entities]
        peer.publish("samples", {"id": f"s{i}", "text": wo.text, "entities": entities})
    started = peer.expect("learner", lambda m: m["event"] == "round_started", timeout=90).json
    assert started["reason"].startswith("new_samples")
    finished = peer.expect("learner", lambda m: m["event"] == "round_finished", timeout=300).json
    assert finished["status"] == "promoted", finished
    assert finished["metric"] == "entity_f1"
    assert finished["candidate_accuracy"] > finished["active_accuracy"] + 0.1, finished

    after = ask(peer, "q1")
    assert after["adapter_version"] == started["version"] == agent.app.engine.adapter_version
    assert after["entities"] != before["entities"]
    assert f1_of(after) > f1_of(before) + 0.1, (f1_of(before), f1_of(after))
    for wo, spans in zip(PROBES, after["entities"], strict=True):
        assert all(wo.text[e["start"] : e["end"]] == e["text"] for e in spans)
