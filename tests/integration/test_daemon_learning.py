"""The acceptance path of on-box learning, over MQTT: samples in, a round trains in a spawned
learner, the gate promotes, the engine hot-swaps, answers change; rollback by command."""

from __future__ import annotations

from tests.integration.conftest import wait_until
from tests.tiny import keyword_samples

LEARNING = {
    "enabled": True,
    "min_new_samples": 150,
    "min_interval_s": 0,
    "epochs": 8,
    "learning_rate": 5e-3,
    "max_cpu_percent": 100,
    "min_free_memory_mb": 0,
    "max_inference_p99_ms": 100000,
    "gate_delta": 0.1,
    "gate_epsilon": 0.01,
    # The round's path alone: the rest of the 400 samples arrive during the round and would
    # refresh the fast learner right after it (tests/integration/test_learner.py covers that).
    "fast_learner_refresh_samples": 0,
}
PROBE = "breaker tripped on machine M3 line 2"


def ask(peer, rid: str) -> dict:
    peer.publish("infer/req", {"id": rid, "text": PROBE})
    return peer.expect("infer/res", lambda m: m["id"] == rid).json


def test_samples_over_mqtt_train_promote_swap_and_rollback(start_agent, peer):
    agent = start_agent()
    peer.publish("config", {"version": 1, "learning": LEARNING}, retain=True)
    peer.expect("config/state", lambda m: m["status"] == "accepted" and m["version"] == 1)
    before = ask(peer, "q0")
    assert before["adapter_version"] is None

    for i, (text, label) in enumerate(keyword_samples(400, seed=11)):
        peer.publish("samples", {"id": f"s{i}", "text": text, "label": label})
    started = peer.expect("learner", lambda m: m["event"] == "round_started", timeout=60).json
    assert started["reason"].startswith("new_samples")
    finished = peer.expect("learner", lambda m: m["event"] == "round_finished", timeout=240).json
    assert finished["status"] == "promoted", finished
    assert finished["candidate_accuracy"] > finished["active_accuracy"]

    after = ask(peer, "q1")
    assert after["adapter_version"] == started["version"]
    assert after["predictions"][0]["label"] == "electrical"
    assert agent.app.engine.adapter_version == started["version"]

    peer.publish("cmd", {"id": "rb", "cmd": "rollback"})
    res = peer.expect("cmd/res", lambda m: m["id"] == "rb").json
    assert res["ok"] and res["result"]["to"] == "base"
    wait_until(lambda: agent.app.engine.adapter_version is None)
    assert ask(peer, "q2")["adapter_version"] is None
