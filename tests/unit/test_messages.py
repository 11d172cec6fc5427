from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import RuntimeConfig
from agent.messages import (
    MAX_PAYLOAD_BYTES,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    Command,
    EntityRequest,
    ErrorCode,
    Event,
    Feedback,
    InferRequest,
    MessageError,
    Sample,
    canonical_spans,
    event_id,
    parse,
)
from agent.topics import Kind, Topics

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
# Texts as a device would send them: any Unicode except surrogates and NUL, not blank.
texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=200,
).filter(lambda s: s.strip())
ids = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


def error_of(kind: Kind, payload: bytes) -> MessageError:
    with pytest.raises(MessageError) as e:
        parse(kind, payload)
    return e.value


# ---- properties -------------------------------------------------------------------------------


@settings(max_examples=300)
@given(kind=st.sampled_from(list(Kind)), payload=st.binary(max_size=300))
def test_any_bytes_give_a_model_or_a_message_error(kind, payload):
    try:
        parse(kind, payload)
    except MessageError as e:
        assert e.code in ErrorCode


@settings(max_examples=300)
@given(kind=st.sampled_from(list(Kind)), value=json_values)
def test_any_json_gives_a_model_or_a_message_error(kind, value):
    try:
        model = parse(kind, enc(value))
    except MessageError as e:
        assert e.code is ErrorCode.INVALID_PAYLOAD
        assert e.message
    else:
        assert isinstance(value, dict)
        assert model is not None


@given(sample_id=st.none() | ids, text=texts, label=texts, ts=st.none() | st.floats(0, 1e10))
def test_valid_samples_round_trip(sample_id, text, label, ts):
    payload = {"text": text, "label": label}
    if sample_id is not None:
        payload["id"] = sample_id
    if ts is not None:
        payload["ts"] = ts
    sample = parse(Kind.SAMPLE, enc(payload))
    assert isinstance(sample, Sample)
    assert (sample.id, sample.text, sample.label, sample.ts) == (sample_id, text, label, ts)
    # a redelivered copy has the same key
    assert parse(Kind.SAMPLE, enc(payload)).key() == sample.key()


@given(batch=st.lists(texts, min_size=1, max_size=20), rid=ids)
def test_valid_infer_requests_round_trip(batch, rid):
    req = parse(Kind.INFER, enc({"id": rid, "texts": batch}))
    assert isinstance(req, InferRequest) and req.all_texts() == batch and req.id == rid
    single = parse(Kind.INFER, enc({"id": rid, "text": batch[0]}))
    assert single.all_texts() == batch[:1]


@given(
    token=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-2e999"]),
    kind=st.sampled_from(list(Kind)),
)
def test_non_finite_numbers_are_rejected_anywhere(token, kind):
    payload = f'{{"id": "x", "ts": {token}, "text": "a", "label": "b", "version": 1}}'.encode()
    assert error_of(kind, payload).code is ErrorCode.INVALID_JSON


@given(text=texts)
def test_event_id_is_stable(text):
    payload = enc({"text": text})
    event = parse(Kind.EVENT, payload)
    assert isinstance(event, Event)
    assert event_id(event, payload) == event_id(event, payload) and event_id(event, payload).startswith("e-")
    assert event_id(parse(Kind.EVENT, enc({"id": "E1", "text": text})), b"") == "E1"


# ---- bad input classes ------------------------------------------------------------------------


def test_invalid_utf8():
    e = error_of(Kind.SAMPLE, b'{"text": "\xff\xfe", "label": "x"}')
    assert e.code is ErrorCode.INVALID_UTF8 and "byte" in e.message


def test_invalid_json_and_non_object():
    assert error_of(Kind.INFER, b"{not json").code is ErrorCode.INVALID_JSON
    assert error_of(Kind.INFER, b"").code is ErrorCode.INVALID_JSON
    assert error_of(Kind.INFER, b"[1, 2]").code is ErrorCode.INVALID_PAYLOAD


def test_deep_nesting_is_rejected_without_recursion_error():
    assert error_of(Kind.INFER, b"[" * 100_000 + b"]" * 100_000).code is ErrorCode.INVALID_JSON
    nested = {"id": "c", "cmd": "status", "args": {}}
    inner = nested["args"]
    for _ in range(40):
        inner["a"] = {}
        inner = inner["a"]
    assert error_of(Kind.COMMAND, enc(nested)).code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("kind", list(Kind))
def test_oversize(kind):
    payload = b" " * (MAX_PAYLOAD_BYTES[kind] + 1)
    e = error_of(kind, payload)
    assert e.code is ErrorCode.OVERSIZE and str(MAX_PAYLOAD_BYTES[kind]) in e.message


def test_limits_inside_the_payload():
    e = error_of(Kind.INFER, enc({"id": "r", "text": "x" * (MAX_TEXT_CHARS + 1)}))
    assert e.code is ErrorCode.INVALID_PAYLOAD and e.message.startswith("text: ")
    e = error_of(Kind.INFER, enc({"id": "r", "texts": ["a"] * (MAX_TEXTS + 1)}))
    assert e.message.startswith("texts: ")


@pytest.mark.parametrize(
    "kind,payload,path",
    [
        (Kind.INFER, {"id": 5, "text": "a"}, "id"),
        (Kind.INFER, {"id": "r"}, "(top level)"),
        (Kind.INFER, {"id": "r", "text": "a", "texts": ["b"]}, "(top level)"),
        (Kind.INFER, {"id": "r", "texts": []}, "texts"),
        (Kind.INFER, {"id": "r", "text": ["a"]}, "text"),
        (Kind.INFER, {"id": "has space", "text": "a"}, "id"),
        (Kind.SAMPLE, {"text": "a"}, "label"),
        (Kind.SAMPLE, {"text": "   ", "label": "x"}, "text"),
        (Kind.SAMPLE, {"text": "a\x00b", "label": "x"}, "text"),
        (Kind.SAMPLE, {"text": "a", "label": "x", "extra": 1}, "extra"),
        (Kind.SAMPLE, {"text": "a", "label": "x", "ts": "yesterday"}, "ts"),
        (Kind.FEEDBACK, {"label": "x"}, "prediction_id"),
        (Kind.EVENT, {"text": 42}, "text"),
        (Kind.COMMAND, {"id": "c", "cmd": "Bad Name"}, "cmd"),
        (Kind.COMMAND, {"id": "c", "cmd": "status", "args": [1]}, "args"),
    ],
)
def test_wrong_shapes_name_the_field(kind, payload, path):
    e = error_of(kind, enc(payload))
    assert e.code is ErrorCode.INVALID_PAYLOAD
    assert any(d.startswith(path + ":") for d in e.details), e.details


def test_unpaired_surrogate_is_rejected():
    e = error_of(Kind.SAMPLE, b'{"text": "bad \\ud800 text", "label": "x"}')
    assert e.code is ErrorCode.INVALID_PAYLOAD and e.details[0].startswith("text: ")


def test_error_keeps_the_request_id_for_the_reply():
    e = error_of(Kind.INFER, enc({"id": "req-7", "text": 3}))
    assert e.request_id == "req-7"
    assert e.payload() == {"id": "req-7", "error": {"code": "invalid_payload", "message": e.message}}
    assert error_of(Kind.INFER, enc({"id": "x" * 500, "text": 3})).request_id is None


def test_config_payloads():
    config = parse(Kind.CONFIG, enc({"version": 4, "inference": {"top_k": 2}}))
    assert isinstance(config, RuntimeConfig) and config.version == 4
    e = error_of(Kind.CONFIG, enc({"version": 5, "inference": {"top_k": 0}}))
    assert e.request_id == "5" and e.details[0].startswith("inference.top_k: ")


def test_models_for_each_kind():
    assert isinstance(parse(Kind.FEEDBACK, enc({"prediction_id": "p1", "label": "x"})), Feedback)
    cmd = parse(Kind.COMMAND, enc({"id": "c1", "cmd": "snapshot", "args": {"k": [1, "a"]}}))
    assert isinstance(cmd, Command) and cmd.args == {"k": [1, "a"]}
    f1 = Feedback(prediction_id="p", label="a")
    assert (
        f1.key()
        == Feedback(prediction_id="p", label="a").key()
        != Feedback(prediction_id="p", label="b").key()
    )
    assert Sample(text="t", label="a").key() != Sample(text="t", label="b").key()
    assert Sample(id="s1", text="t", label="a").key() == "id:s1"


# ---- entities -----------------------------------------------------------------------------------

SPANS = [
    {"start": 9, "end": 16, "label": "PART"},
    {"start": 0, "end": 8, "label": "ACTION", "text": "replaced"},
]


def test_entity_requests_take_the_shape_and_limits_of_infer_requests():
    req = parse(Kind.ENTITIES, enc({"id": "n1", "texts": ["a", "b"]}))
    assert isinstance(req, EntityRequest) and req.all_texts() == ["a", "b"]
    assert MAX_PAYLOAD_BYTES[Kind.ENTITIES] == MAX_PAYLOAD_BYTES[Kind.INFER]
    e = error_of(Kind.ENTITIES, enc({"id": "n", "texts": ["a"] * (MAX_TEXTS + 1)}))
    assert e.code is ErrorCode.INVALID_PAYLOAD and e.message.startswith("texts: ") and e.request_id == "n"
    assert error_of(Kind.ENTITIES, enc({"id": "n", "text": "a", "texts": ["b"]})).details == [
        "(top level): give exactly one of text or texts"
    ]


def test_span_samples_parse_and_keep_their_entities_as_sent():
    sample = parse(Kind.SAMPLE, enc({"text": "replaced bearing", "entities": SPANS, "ts": 5.0}))
    assert isinstance(sample, Sample)
    assert (sample.label, sample.entities, sample.ts) == (None, SPANS, 5.0)
    # the spans' own checks need the bundle's labels: the handler does them, not the schema
    odd = parse(Kind.SAMPLE, enc({"text": "t", "entities": [{"start": "0", "end": 1, "label": "X"}, 3]}))
    assert isinstance(odd, Sample) and odd.entities == [{"start": "0", "end": 1, "label": "X"}, 3]


@pytest.mark.parametrize(
    "payload,details",
    [
        ({"text": "a"}, ["label: Field required"]),  # as before entities existed
        ({"text": "a", "entities": None}, ["label: Field required"]),
        (
            {"text": "a", "label": "x", "entities": SPANS},
            ["(top level): give either label (the text's class) or entities (its spans), not both"],
        ),
        # a malformed entities field is the one error: no "label" missing as well
        ({"text": "a", "entities": "PART"}, ['entities: Input should be a valid list (got "PART")']),
        (
            {"text": 3, "label": 4},
            ["text: Input should be a valid string (got 3)", "label: Input should be a valid string (got 4)"],
        ),
    ],
)
def test_a_sample_has_exactly_one_of_label_and_entities(payload, details):
    e = error_of(Kind.SAMPLE, enc(payload))
    assert e.code is ErrorCode.INVALID_PAYLOAD and e.details == details


def test_span_sample_key_is_its_id_or_text_and_canonical_spans():
    spans = [(0, 8, "ACTION"), (9, 16, "PART")]
    sample = Sample(text="replaced bearing", entities=list(SPANS))
    key = sample.key(spans)
    assert key.startswith("sha256:") and key == Sample(text="replaced bearing", entities=[]).key(spans)
    assert key != sample.key([(0, 8, "ACTION")]) != Sample(text="replaced bearings", entities=[]).key(spans)
    assert key != Sample(text="replaced bearing", label=canonical_spans(spans)).key()
    assert Sample(id="n1", text="t", entities=[]).key() == "id:n1"
    with pytest.raises(ValueError, match="validated spans"):
        sample.key()
    assert canonical_spans(spans) == '[[0,8,"ACTION"],[9,16,"PART"]]'


# ---- topics -----------------------------------------------------------------------------------


def test_topics_namespace():
    t = Topics("plant-a", "box1")
    assert t.infer_req == "edge/plant-a/box1/infer/req"
    assert t.status == "edge/plant-a/box1/status"
    assert t.kind_of("edge/plant-a/box1/samples") is Kind.SAMPLE
    assert t.kind_of("edge/plant-a/box1/telemetry") is None
    assert t.kind_of("edge/plant-b/box1/samples") is None
    assert t.result_topic(Kind.FEEDBACK) == "edge/plant-a/box1/feedback/res"
    assert t.result_topic(Kind.CONFIG) == t.config_state
    assert t.kind_of("edge/plant-a/box1/entities/req") is Kind.ENTITIES
    assert t.result_topic(Kind.ENTITIES) == t.entities_res == "edge/plant-a/box1/entities/res"
    assert t.entities == "edge/plant-a/box1/entities" and t.kind_of(t.entities) is None
    assert set(t.inbound().values()) == set(Kind)
    for bad in ("a/b", "+", "#", "", "$SYS"):
        with pytest.raises(ValueError):
            Topics(bad, "box1")
