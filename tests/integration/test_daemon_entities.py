"""The daemon serving a token-classification bundle: entities/req, events -> entities, span samples,
and each task refusing the other's messages. Real mosquitto, real SQLite, the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.store import ENTITY_SAMPLE_LABEL, holdout_target
from tests.integration.conftest import (
    ENGINE_FP32_ONE_THREAD,
    ENTITY_LABELS,
    db_path,
    query,
    wait_until,
    write_agent_config,
)
from tools.workorders import workorder_dataset

TEXTS = [wo.text for wo in workorder_dataset(12, seed=7)]
TEXT = "replaced bearing on pump P-101"  # ACTION [0, 8), PART [9, 16), ASSET [20, 30)


@pytest.fixture(scope="module")
def ner_adapter(token_bundle, tmp_path_factory) -> Path:
    """A random adapter with a perturbed head: the base head of a random model finds few spans."""
    from tests.tiny import make_random_adapter

    out = tmp_path_factory.mktemp("ner-adapter") / "ner-1"
    return make_random_adapter(token_bundle, out, seed=5, version="ner-1", head_std=2.0)


@pytest.fixture
def token_config(tmp_path, broker, token_bundle, ner_adapter) -> Path:
    engine = ENGINE_FP32_ONE_THREAD + f'adapter_dir = "{ner_adapter}"\n'
    return write_agent_config(
        tmp_path / "token-agent.toml", broker, token_bundle, tmp_path / "token-data", engine=engine
    )


def stored(config: Path) -> tuple[int, int, int]:
    return query(
        db_path(config),
        "SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM feedback),"
        " (SELECT count(*) FROM predictions)",
    )[0]


def status_counters(peer, cmd_id: str) -> dict:
    """The counters as telemetry and ``cmd status`` report them."""
    peer.publish("cmd", {"id": cmd_id, "cmd": "status"})
    return peer.expect("cmd/res", lambda m: m["id"] == cmd_id).json["result"]["counters"]


def check_spans(text: str, spans: list[dict]) -> None:
    for span in spans:
        assert set(span) == {"label", "start", "end", "text", "score"}
        assert 0 <= span["start"] < span["end"] <= len(text)
        assert text[span["start"] : span["end"]] == span["text"] and span["text"].strip() == span["text"]
        assert span["label"] in ENTITY_LABELS and 0 < span["score"] <= 1
    offsets = [(s["start"], s["end"]) for s in spans]
    assert offsets == sorted(offsets)  # by start, and none overlaps the next
    assert all(end <= start for (_, end), (start, _) in zip(offsets, offsets[1:], strict=False))


# ---- requests -----------------------------------------------------------------------------------


def test_entity_requests_are_answered_with_spans_that_slice_the_text(start_agent, peer, token_config):
    start_agent(token_config)
    peer.publish("entities/req", {"id": "n1", "text": TEXT})
    res = peer.expect("entities/res", lambda m: m["id"] == "n1").json
    assert set(res) == {"id", "entities", "adapter_version", "model", "latency_ms"}
    assert len(res["entities"]) == 1 and res["adapter_version"] == "ner-1" and res["latency_ms"] > 0
    assert res["model"] == "transformer"  # the adapter carries no CRF
    check_spans(TEXT, res["entities"][0])

    peer.publish("entities/req", {"id": "n2", "texts": TEXTS})
    res = peer.expect("entities/res", lambda m: m["id"] == "n2").json
    assert len(res["entities"]) == len(TEXTS)
    for text, spans in zip(TEXTS, res["entities"], strict=True):
        check_spans(text, spans)
    assert sum(map(len, res["entities"])) > len(TEXTS)  # the adapter's head finds entities

    # an MQTT 5 response topic and correlation data win, as for infer/req
    peer.publish(
        "entities/req", {"id": "n3", "text": TEXT}, response_topic="reply/ner", correlation_data=b"c3"
    )
    reply = peer.expect("reply/ner")
    assert reply.json["id"] == "n3" and reply.correlation_data == b"c3"
    assert reply.json["entities"] == peer.expect("entities/res", lambda m: m["id"] == "n1").json["entities"]
    assert not [m for m in peer.on("entities/res") if m.json["id"] == "n3"] and not peer.on("infer/res")


def test_a_token_box_refuses_classification_requests_labels_and_feedback(start_agent, peer, token_config):
    agent = start_agent(token_config)
    peer.publish("infer/req", {"id": "i1", "text": TEXT})
    err = peer.expect("infer/res", lambda m: m["id"] == "i1").json["error"]
    assert err["code"] == "not_available" and "entities/req" in err["message"]
    assert "extracts entities" in err["message"]

    peer.publish("feedback", {"id": "f1", "prediction_id": "ev-1", "label": "B-PART"})
    err = peer.expect("feedback/res", lambda m: m["id"] == "f1").json["error"]
    assert err["code"] == "not_available" and "corrected spans as a sample" in err["message"]

    # a tag of the bundle is no label: a label sample is refused, whatever its label
    peer.publish("samples", {"id": "s1", "text": TEXT, "label": "B-PART"})
    err = peer.expect("samples/res", lambda m: m["id"] == "s1").json["error"]
    assert err["code"] == "not_available" and "entities" in err["message"]

    counters = status_counters(peer, "c1")
    assert counters["rejected"] == {"not_available": 3}
    # status says what the box answers, and the labels a sample may use (not the head's tags)
    peer.publish("cmd", {"id": "c2", "cmd": "status"})
    status = peer.expect("cmd/res", lambda m: m["id"] == "c2").json["result"]
    assert status["task"] == "token-classification" and status["labels"] == sorted(ENTITY_LABELS)
    assert counters["rejected_by_topic"] == {"infer/req": 1, "feedback": 1, "samples": 1}
    assert stored(token_config) == (0, 0, 0)
    assert agent.app.counters.get("stored", "samples") == 0


def test_a_classifier_refuses_entity_requests_and_span_samples(start_agent, peer, agent_config):
    start_agent()  # the tiny sequence-classification bundle
    peer.publish("entities/req", {"id": "n1", "text": TEXT})
    err = peer.expect("entities/res", lambda m: m["id"] == "n1").json["error"]
    assert err["code"] == "not_available" and "infer/req" in err["message"]
    peer.publish(
        "samples", {"id": "s1", "text": TEXT, "entities": [{"start": 9, "end": 16, "label": "PART"}]}
    )
    err = peer.expect("samples/res", lambda m: m["id"] == "s1").json["error"]
    assert err["code"] == "not_available" and "label" in err["message"]
    assert status_counters(peer, "c1")["rejected"] == {"not_available": 2}
    assert stored(agent_config) == (0, 0, 0)
    # and it still classifies
    peer.publish("infer/req", {"id": "i1", "text": TEXT})
    assert peer.expect("infer/res", lambda m: m["id"] == "i1").json["predictions"]


# ---- events -------------------------------------------------------------------------------------


def test_events_on_a_token_box_publish_spans_and_are_stored_once(start_agent, peer, token_config):
    agent = start_agent(token_config)
    events = [
        {"id": f"ev-{i}", "text": text, "source": "cmms", "ts": 1.7e9 + i} for i, text in enumerate(TEXTS)
    ]
    for event in events:
        peer.publish("events", event)
    published = {e["id"]: peer.expect("entities", lambda m, i=e["id"]: m["id"] == i).json for e in events}
    db = db_path(token_config)
    rows = {
        r[0]: r[1:]
        for r in query(
            db, "SELECT id, text, label, score, top_k, entities, adapter_version, source FROM predictions"
        )
    }
    assert set(rows) == set(published)
    found = 0
    for event in events:
        msg = published[event["id"]]
        assert set(msg) == {"id", "entities", "adapter_version", "model", "source", "ts", "latency_ms"}
        assert (msg["adapter_version"], msg["source"], msg["ts"]) == ("ner-1", "cmms", event["ts"])
        check_spans(event["text"], msg["entities"])
        text, label, score, top_k, entities, version, source = rows[event["id"]]
        assert (text, label, top_k, version, source) == (
            event["text"],
            ENTITY_SAMPLE_LABEL,
            "[]",
            "ner-1",
            "cmms",
        )
        assert json.loads(entities) == [
            [s["start"], s["end"], s["label"], s["score"]] for s in msg["entities"]
        ]
        assert score == min((s["score"] for s in msg["entities"]), default=1.0)
        found += len(msg["entities"])
    assert found > 0
    assert not peer.on("predictions")  # a token box's events are answered on `entities` only

    # a redelivered event: published again (its sender waits for it), stored once
    peer.publish("events", events[0])
    wait_until(lambda: len([m for m in peer.on("entities") if m.json["id"] == "ev-0"]) == 2, what="republish")
    assert query(db, "SELECT count(*) FROM predictions") == [(len(events),)]
    assert agent.app.counters.get("duplicates", "events") == 1


# ---- span samples -------------------------------------------------------------------------------


def test_span_samples_are_stored_with_their_spans_as_json(start_agent, peer, token_config):
    agent = start_agent(token_config)
    entities = [
        {"start": 20, "end": 30, "label": "ASSET", "text": "pump P-101"},
        {"start": 8, "end": 16, "label": "PART"},  # " bearing": its leading space is trimmed off
        {"start": 0, "end": 8, "label": "ACTION"},
    ]
    n = 20
    for i in range(n):
        peer.publish("samples", {"id": f"n{i}", "text": TEXT, "entities": entities, "ts": 1.7e9})
    peer.publish("samples", {"id": "n3", "text": TEXT, "entities": entities})  # redelivered id
    # without an id: the content is the key, spans in any order are the same sample
    peer.publish("samples", {"text": TEXT, "entities": entities})
    peer.publish("samples", {"text": TEXT, "entities": entities[::-1]})
    peer.publish("samples", {"text": TEXT, "entities": []})  # a text with no entities is a sample too
    wait_until(lambda: agent.app.counters.get("duplicates", "samples") == 2, what="two duplicates")
    wait_until(lambda: agent.app.counters.get("stored", "samples") == n + 2, what="samples stored")
    db = db_path(token_config)
    rows = query(db, "SELECT sample_id, text, label, entities, bytes FROM samples ORDER BY id")
    canonical = '[[0,8,"ACTION"],[9,16,"PART"],[20,30,"ASSET"]]'
    assert [r[0] for r in rows] == [f"n{i}" for i in range(n)] + [None, None]
    assert {r[1:4] for r in rows[:-1]} == {(TEXT, ENTITY_SAMPLE_LABEL, canonical)}
    assert rows[-1][1:4] == (TEXT, ENTITY_SAMPLE_LABEL, "[]")
    assert rows[0][4] == len(TEXT) + len(ENTITY_SAMPLE_LABEL) + len(canonical)
    # one stratum: 10 % of the span samples in the holdout
    assert query(db, "SELECT count(*) FROM samples WHERE entities IS NOT NULL AND split = 'holdout'") == [
        (holdout_target(n + 2, 0.1),)
    ]
    assert not peer.on("samples/res")


BAD_SPAN_SAMPLES = [
    ("invalid_payload", "outside the text", {"entities": [{"start": 20, "end": 99, "label": "ASSET"}]}),
    (
        "invalid_payload",
        "overlap",
        {"entities": [{"start": 0, "end": 16, "label": "ACTION"}, {"start": 9, "end": 16, "label": "PART"}]},
    ),
    ("unknown_label", "unknown label 'COLOUR'", {"entities": [{"start": 9, "end": 16, "label": "COLOUR"}]}),
    (
        "invalid_payload",
        "start must be an integer",
        {"entities": [{"start": "9", "end": 16, "label": "PART"}]},
    ),
    (
        "invalid_payload",
        "differs from the text",
        {"entities": [{"start": 9, "end": 16, "label": "PART", "text": "bearings"}]},
    ),
    # a malformed span is reported before an unknown label elsewhere in the same sample
    (
        "invalid_payload",
        "overlap",
        {
            "entities": [
                {"start": 0, "end": 8, "label": "COLOUR"},
                {"start": 9, "end": 16, "label": "PART"},
                {"start": 10, "end": 12, "label": "PART"},
            ]
        },
    ),
    (
        "invalid_payload",
        "not both",
        {"label": "PART", "entities": [{"start": 9, "end": 16, "label": "PART"}]},
    ),
    ("invalid_payload", "label: Field required", {}),
]


def test_bad_span_samples_are_refused_counted_and_not_stored(start_agent, peer, token_config):
    start_agent(token_config)
    for i, (_, _, fields) in enumerate(BAD_SPAN_SAMPLES):
        peer.publish("samples", {"id": f"bad{i}", "text": TEXT, **fields})
    wait_until(lambda: len(peer.on("samples/res")) >= len(BAD_SPAN_SAMPLES), what="an error per bad sample")
    errors = [m.json for m in peer.on("samples/res")]
    assert [e["id"] for e in errors] == [f"bad{i}" for i in range(len(BAD_SPAN_SAMPLES))]
    for error, (code, words, _) in zip(errors, BAD_SPAN_SAMPLES, strict=True):
        assert error["error"]["code"] == code and words in error["error"]["message"], error
    counters = status_counters(peer, "c1")
    assert counters["rejected"] == {"invalid_payload": 7, "unknown_label": 1}
    assert counters["rejected_by_topic"] == {"samples": len(BAD_SPAN_SAMPLES)}
    assert "samples" not in counters.get("stored", {})
    assert stored(token_config) == (0, 0, 0)
    # a good one after them is stored
    peer.publish(
        "samples", {"id": "good", "text": TEXT, "entities": [{"start": 9, "end": 16, "label": "PART"}]}
    )
    wait_until(lambda: stored(token_config) == (1, 0, 0), what="the good sample stored")
