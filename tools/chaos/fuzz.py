"""Hostile input against every inbound topic: over MQTT at a live agent, and in process with hypothesis.

Over MQTT (``fuzz_over_mqtt``): raw random bytes, random JSON (NaN/Infinity literals, deep nesting,
huge strings, NULs, lone surrogates) and mutations of each topic's valid payload (keys dropped,
retyped, added; unknown labels; oversize) go to every topic a fleet box subscribes to. Payloads
that happen to be valid are kept where their effect is predictable (samples: stored; requests and
events: answered) and regenerated where they would legitimately change state (config, cmd, the
fleet's round and global), so afterwards the box must be alive, serve the same config, adapter and
round, and hold exactly the valid samples.

In process (``fuzz_in_process``): hypothesis strategies against the parsers every handler starts
with (``agent.messages.parse`` for each box topic, ``agent.fed.protocol``, ``agent.fed.wire``):
they raise their own error type with a reason, or return a model, and nothing else.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

from agent.entities import SpanError, validate_spans
from agent.fed import protocol
from agent.fed.wire import WireError, parse_chunk, tensors_from_bytes
from agent.messages import MessageError, Sample, parse
from agent.topics import Kind
from tests.integration.conftest import Peer, wait_until
from tests.tiny import TINY_LABELS
from tools.chaos.world import OPERATOR, Box, World, settle_rows
from tools.workorders import ENTITY_LABELS

VALID: dict[str, dict[str, Any]] = {
    "infer/req": {"id": "r1", "text": "motor M4 overheating"},
    # The fuzzed box classifies: entity requests and span samples are refused (not_available).
    "entities/req": {"id": "n1", "text": "replaced seal on pump P-101"},
    "events": {"id": "e1", "text": "conveyor C2 current high", "source": "plc3"},
    "samples": {"id": "s1", "text": "belt worn on packer 3", "label": "mechanical"},
    "feedback": {"id": "f1", "prediction_id": "e1", "label": "thermal"},
    "config": {"version": 7, "inference": {"top_k": 2}},
    "cmd": {"id": "c1", "cmd": "status"},
    "fed/f1/round": {
        "fleet": "f1", "round": 3, "base_hash": "0" * 64, "strategy": "ffa_lora", "lora_seed": 7,
        "deadline": 1e10, "min_uploads": 1, "opened_at": 0.0,
    },
    "fed/f1/global": {"kind": "global", "fleet": "f1", "round": 3, "version": "g3", "sha256": "0" * 64},
    "fed/f1/res/box-1": {"upload_id": "u1", "status": "accepted", "round": 1},
}  # fmt: skip
KIND_OF = {
    "infer/req": Kind.INFER,
    "entities/req": Kind.ENTITIES,
    "events": Kind.EVENT,
    "samples": Kind.SAMPLE,
    "feedback": Kind.FEEDBACK,
    "config": Kind.CONFIG,
    "cmd": Kind.COMMAND,
}
STATEFUL = ("config", "cmd", "fed/f1/round", "fed/f1/global", "fed/f1/global/chunk/0")
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "é" * 3,
    "x" * 5000,
    "NaN",
    "🚨",
    "\n\t",
    "'; DROP TABLE samples; --",
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.3:
        return rng.choice(
            [
                None,
                True,
                False,
                rng.randint(-(2**70), 2**70),
                rng.random() * 1e300,
                rng.choice(ODD_STRINGS),
                rng.choice(TINY_LABELS),
            ]
        )
    if roll < 0.65:
        return {
            rng.choice(
                ["id", "text", "label", "version", "cmd", "args", rng.choice(ODD_STRINGS)]
            ): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 5))
        }
    return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def mutate(rng: random.Random, valid: dict[str, Any]) -> Any:
    body: Any = json.loads(json.dumps(valid))
    for _ in range(rng.randint(1, 3)):
        if not isinstance(body, dict):
            break  # wrapped in a list or a scalar: mutated enough
        op = rng.randrange(6)
        key = rng.choice(list(body)) if body else "id"
        if op == 0:
            body.pop(key, None)
        elif op == 1:
            body[key] = random_json(rng, 3)
        elif op == 2:
            body[rng.choice(ODD_STRINGS)] = random_json(rng, 3)
        elif op == 3 and "label" in body:
            body["label"] = rng.choice(["no-such-label", "", "x" * 200])
        elif op == 4:
            body[key] = rng.choice(ODD_STRINGS)
        else:
            body = {"nested": body} if rng.random() < 0.5 else [body] * rng.randint(0, 3)
    return body


def payload_for(rng: random.Random, topic: str) -> bytes:
    roll = rng.random()
    if roll < 0.2:
        return rng.randbytes(rng.randint(0, 600))
    if roll < 0.35:
        tokens = ["NaN", "Infinity", "-Infinity", "[" * 5000, '{"a":' * 200, '"\\ud800"', "1e999"]
        return rng.choice(tokens).encode()
    if roll < 0.55:
        return json.dumps(random_json(rng)).encode()
    return json.dumps(mutate(rng, VALID.get(topic, {"x": 1})), allow_nan=True).encode()


def is_valid(topic: str, payload: bytes) -> bool:
    if topic in KIND_OF:
        try:
            model = parse(KIND_OF[topic], payload)
        except MessageError:
            return False
        return not isinstance(model, Sample) or model.label in TINY_LABELS
    model_of = {
        "fed/f1/round": protocol.RoundAnnouncement,
        "fed/f1/global": protocol.GlobalManifest,
        "fed/f1/res/box-1": protocol.UploadResult,
    }
    if topic in model_of:
        try:
            protocol.parse_json(payload, model_of[topic])
        except protocol.ProtocolError:
            return False
        return True
    try:
        parse_chunk(payload)
    except WireError:
        return False
    return True


def fuzz_over_mqtt(world: World, box: Box, n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` hostile messages at ``box``; the invariants afterwards (see the module docstring)."""
    rng = random.Random(seed)
    topics = [*KIND_OF, "fed/f1/round", "fed/f1/global", "fed/f1/global/chunk/0", "fed/f1/res/box-1"]
    # The test's own client hears only the answers it waits for: 100,000 hostile messages and their
    # error replies in its inbox would make every wait a scan of them.
    world.peer.client.unsubscribe(["edge/plant-t/#", "fed/#"])
    world.peer.subscribe(box.topic("infer/res"), box.topic("cmd/res"))
    with world.peer._cond:
        world.peer.received.clear()
    before = world.command(box, "status")["result"]
    samples_before = box.query("SELECT count(*) FROM samples")[0][0]
    valid_sample_keys: set[str] = set()
    sender = world.client(*OPERATOR) if world.passwords else Peer(world.broker)
    sent = {t: 0 for t in topics}
    done = threading.Event()
    failure: list[BaseException] = []

    def send() -> None:
        try:
            _send()
        except BaseException as e:  # noqa: BLE001 - reported below, not lost in a thread
            failure.append(e)
        finally:
            done.set()

    def _send() -> None:
        for i in range(n):
            topic = topics[i % len(topics)]
            payload = payload_for(rng, topic)
            while topic in STATEFUL and is_valid(topic, payload):
                payload = payload_for(rng, topic)
            if topic == "samples" and is_valid(topic, payload):
                valid_sample_keys.add(parse(Kind.SAMPLE, payload).key())
            full = topic if topic.startswith("fed/") else box.topic(topic)
            sender.client.publish(full, payload, qos=1)
            sent[topic] += 1
            if i % 500 == 499:
                time.sleep(0.01)  # let paho's queue drain: the broker, not our memory, is under test

    t0 = time.monotonic()
    threading.Thread(target=send, daemon=True).start()
    wait_until(done.is_set, timeout=600, what="fuzz sent")
    if failure:
        raise failure[0]
    # Everything sent is through once a QoS 1 sample published after it is stored: the broker hands
    # a box its QoS 1 messages in order and the ingest writer commits them in order. (A request is
    # no barrier: requests are QoS 0 and pass the QoS 1 backlog; nor is a quiet store, since valid
    # samples are a handful among 100,000 messages: 2 of 9 were counted lost that way, still queued.)
    marker = f"fuzz-barrier-{seed}-{n}"
    sender.client.publish(
        box.topic("samples"),
        json.dumps({"id": marker, "text": "fuzz barrier", "label": TINY_LABELS[0]}),
        qos=1,
    )
    wait_until(
        lambda: box.query("SELECT count(*) FROM samples WHERE sample_id = ?", (marker,))[0][0] == 1,
        timeout=600,
        what="the barrier sample after the fuzz",
    )
    expected = samples_before + len(valid_sample_keys) + 1
    stored = settle_rows(box, expected, quiet_s=5.0, timeout=60)
    assert world.ask(box, timeout=60).get("predictions"), "no answer after the fuzz"
    after = world.command(box, "status")["result"]
    sender.close()
    return {
        "messages": n,
        "seconds": round(time.monotonic() - t0, 1),
        "per_topic": sent,
        "alive": box.alive(),
        "config_unchanged": after["config_version"] == before["config_version"],
        "adapter_unchanged": after["adapter_version"] == before["adapter_version"],
        "round_unchanged": (after.get("sync") or {}).get("round") == (before.get("sync") or {}).get("round"),
        "samples_expected": expected,
        "samples_stored": stored,
        "rejected": sum(after["counters"].get("rejected", {}).values()),
    }


def fuzz_in_process(examples: int = 300) -> dict[str, Any]:
    """Hypothesis against every parser a handler starts with; returns how many inputs ran."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    count = {"n": 0}
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=20,
    )
    payloads = st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    cfg = settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )

    @cfg
    @given(payloads, st.sampled_from(list(Kind)))
    def box_topics(payload: bytes, kind: Kind) -> None:
        count["n"] += 1
        try:
            parse(kind, payload)
        except MessageError as e:
            assert e.message and e.code
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            raise AssertionError(f"parse({kind}) raised {type(e).__name__}: {e}") from e

    @cfg
    @given(
        payloads,
        st.sampled_from(
            [protocol.RoundAnnouncement, protocol.UploadMeta, protocol.UploadResult, protocol.GlobalManifest]
        ),
    )
    def fed_messages(payload: bytes, model: type) -> None:
        count["n"] += 1
        try:
            protocol.parse_json(payload, model)
        except protocol.ProtocolError as e:
            assert str(e) and e.code
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"parse_json({model.__name__}) raised {type(e).__name__}: {e}") from e

    @cfg
    @given(st.binary(max_size=600))
    def frames(payload: bytes) -> None:
        count["n"] += 1
        for fn in (parse_chunk, tensors_from_bytes):
            try:
                fn(payload)
            except WireError as e:
                assert str(e) and e.code
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{fn.__name__} raised {type(e).__name__}: {e}") from e

    @cfg
    @given(st.text(max_size=40), json_values)
    def span_samples(text: str, entities: Any) -> None:
        # What a token box's sample handler runs on the entities of a parsed sample.
        count["n"] += 1
        try:
            validate_spans(text, entities, ENTITY_LABELS)
        except SpanError as e:
            assert str(e)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"validate_spans raised {type(e).__name__}: {e}") from e

    box_topics()
    fed_messages()
    frames()
    span_samples()
    return {"messages": count["n"], "crashes": 0}
