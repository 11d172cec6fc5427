"""Over a real mosquitto: answers, predictions and status name the model that answered once the
active adapter's directory carries the fast learner and the gate chose the combination."""

from __future__ import annotations

import shutil

from tests.tiny import TINY_LABELS, keyword_samples


def _combined_unit(random_adapter, tmp_path):
    from agent.linear import LinearConfig, fit_linear, save_linear, write_serving

    rows = keyword_samples(120, seed=1)
    linear = fit_linear(
        [t for t, _ in rows],
        [lab for _, lab in rows],
        TINY_LABELS,
        LinearConfig(TINY_LABELS, n_features=1 << 12, weight=0.7),
    )
    unit = tmp_path / "unit"
    shutil.copytree(random_adapter, unit)
    save_linear(unit, linear)
    write_serving(unit, "combined", ["test"])
    return unit


def test_a_combined_answer_names_its_model(start_agent, peer, broker, random_adapter, tmp_path):
    agent = start_agent()
    peer.publish("infer/req", {"id": "before", "text": "breaker tripped on machine M6 line 3"})
    res = peer.expect("infer/res", lambda m: m["id"] == "before").json
    assert res["predictions"][0]["model"] == "transformer"

    agent.app.engine.activate_adapter(_combined_unit(random_adapter, tmp_path))
    texts = [t for t, _ in keyword_samples(4, seed=5)]
    peer.publish("infer/req", {"id": "after", "texts": texts})
    res = peer.expect("infer/res", lambda m: m["id"] == "after").json
    assert [p["model"] for p in res["predictions"]] == ["combined"] * len(texts)
    assert res["adapter_version"] == "a1" and all(p["label"] in TINY_LABELS for p in res["predictions"])

    peer.publish("events", {"id": "ev-c", "text": "gear backlash on machine M17 line 5"})
    assert peer.expect("predictions", lambda m: m["id"] == "ev-c").json["model"] == "combined"

    peer.publish("cmd", {"id": "s", "cmd": "status"})
    status = peer.expect("cmd/res", lambda m: m["id"] == "s").json
    assert status["ok"] and status["result"]["serving_model"] == "combined"
    peer.publish("config", {"version": 1, "telemetry": {"interval_s": 1}}, retain=True)
    t = peer.expect("telemetry", lambda m: m["config_version"] == 1, timeout=15).json
    assert t["serving_model"] == "combined" and t["inference"]["serving_model"] == "combined"
