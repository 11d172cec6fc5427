"""Chunk framing, reassembly, tensor codec, signatures: what carries adapters between box and HQ."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.fed.signing import (
    SignatureError,
    generate_keys,
    load_private_key,
    load_public_keys,
    sign_manifest,
    verify_manifest,
)
from agent.fed.wire import (
    Reassembler,
    WireError,
    canonical_json,
    join_chunks,
    parse_chunk,
    split_blob,
    tensors_from_bytes,
    tensors_to_bytes,
)


@given(data=st.binary(max_size=5000), chunk=st.integers(1, 700), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_any_blob_survives_any_chunking_in_any_order(data, chunk, seed):
    frames = split_blob("b1", data, {"version": "v1"}, chunk)
    random.Random(seed).shuffle(frames)
    r = Reassembler()
    results = [r.add(parse_chunk(f)) for f in frames]
    assert all(x is None for x in results[:-1])
    meta, whole = results[-1]
    assert whole == data and meta == {"version": "v1"}
    assert r.pending() == {}


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_bytes_are_refused_with_a_reason(raw):
    try:
        parse_chunk(raw)
    except WireError as e:
        assert e.code == "bad_frame" and str(e)


def test_a_tampered_chunk_spoils_the_whole_blob():
    data = bytes(range(256)) * 40
    frames = split_blob("b2", data, {}, 1000)
    bad = bytearray(frames[3])
    bad[-1] ^= 0xFF
    chunks = {c.index: c for c in (parse_chunk(f) for f in [*frames[:3], bytes(bad), *frames[4:]])}
    with pytest.raises(WireError) as e:
        join_chunks(chunks)
    assert e.value.code == "bad_hash"
    del chunks[5]
    with pytest.raises(WireError) as e:
        join_chunks(chunks)
    assert e.value.code == "incomplete"


def test_chunks_of_two_blobs_do_not_mix():
    a = split_blob("same", b"a" * 3000, {"v": 1}, 1000)
    b = split_blob("same", b"b" * 3000, {"v": 2}, 1000)
    with pytest.raises(WireError) as e:
        join_chunks({c.index: c for c in map(parse_chunk, [a[0], b[1], a[2]])})
    assert e.value.code == "mixed_chunks"


def test_reassembler_bounds_what_it_holds():
    r = Reassembler(max_blobs=2)
    for i in range(5):
        r.add(parse_chunk(split_blob(f"b{i}", b"x" * 2000, {}, 1000)[0]))
    assert sorted(r.pending()) == ["b3", "b4"]


def test_tensor_codec_refuses_nan_and_other_dtypes():
    t = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert np.array_equal(tensors_from_bytes(tensors_to_bytes(t))["x"], t["x"])
    with pytest.raises(WireError) as e:
        tensors_from_bytes(tensors_to_bytes({"x": np.array([np.nan], np.float32)}))
    assert e.value.code == "non_finite"
    from safetensors.numpy import save

    with pytest.raises(WireError) as e:
        tensors_from_bytes(save({"x": np.zeros(2, np.float64)}))
    assert e.value.code == "bad_tensors"
    with pytest.raises(WireError):
        tensors_from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")


def test_signatures_verify_and_catch_every_change(tmp_path):
    private, public = generate_keys(tmp_path / "k")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path / "k")
    key, keys = load_private_key(private), load_public_keys([public])
    m = sign_manifest({"version": "g1", "sha256": "ab" * 32, "round": 3}, key)
    assert verify_manifest(json.loads(canonical_json(m)), keys) == m["key_id"]
    for change in ({"round": 4}, {"sha256": "cd" * 32}, {"key_id": "0" * 16}):
        with pytest.raises(SignatureError):
            verify_manifest({**m, **change}, keys)
    with pytest.raises(SignatureError) as e:
        verify_manifest({k: v for k, v in m.items() if k != "signature"}, keys)
    assert e.value.code == "unsigned"
    _, other_pub = generate_keys(tmp_path / "other")
    with pytest.raises(SignatureError) as e:
        verify_manifest(m, load_public_keys([other_pub]))
    assert e.value.code == "unknown_key"
    # A rotation: boxes that trust both keys accept either.
    assert verify_manifest(m, load_public_keys([other_pub, public])) == m["key_id"]


def test_deep_nesting_is_refused_not_a_recursion_error():
    # Found by the chaos suite's fuzzing: json.loads raised RecursionError past the parsers.
    from agent.fed.protocol import ProtocolError, UploadResult, parse_json
    from agent.fed.wire import _LEN, MAGIC

    with pytest.raises(ProtocolError) as e:
        parse_json(b"[" * 5000, UploadResult)
    assert e.value.code == "invalid_json"
    header = b"[" * 60000
    with pytest.raises(WireError) as w:
        parse_chunk(MAGIC + _LEN.pack(len(header)) + header)
    assert w.value.code == "bad_frame"
