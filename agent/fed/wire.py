"""How adapters travel over MQTT: tensors as safetensors bytes, cut into self-describing chunks.

A broker limits packet sizes (the shipped mosquitto config: ``max_packet_size``), and adapters of
a real model are megabytes, so every blob (an upload, a global) goes as ``n`` chunk messages. Each
chunk is one frame::

    b"EAF1" | u32 big-endian header length | header (JSON, UTF-8) | data

The header names the blob (``blob``: an id), the chunk (``i`` of ``n``), the blob's total ``size``
and ``sha256``, and carries the blob's ``meta`` (the same JSON object in every chunk, so chunks
may arrive in any order). A receiver uses a blob only when every chunk is there and the sha256 of
the joined data matches: a tampered, truncated or mixed-up transfer is refused whole.

Pure: no MQTT, no disk. safetensors (not pickle) for tensors, so parsing hostile bytes runs no code.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"EAF1"
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNKS = 4096
# An upload of the default bundle is ~1.3 MB (FFA-LoRA: ~0.7 MB); a ceiling far above real blobs.
MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_ID_CHARS = 128


class WireError(ValueError):
    """Bytes that are not a valid chunk or blob; the message says why (for the result topic)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def canonical_json(obj: Any) -> bytes:
    """One byte string per JSON value: what signatures and hashes are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- tensors <-> bytes ----------------------------------------------------------------------


def tensors_to_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})


def tensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes; non-finite values and non-float32 dtypes are refused here."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, OSError, TypeError) as e:
        raise WireError("bad_tensors", f"not a safetensors blob: {e}") from e
    for key, value in tensors.items():
        if value.dtype != np.float32:
            raise WireError("bad_tensors", f"{key}: dtype {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            raise WireError("non_finite", f"{key}: contains NaN or Inf")
    return tensors


# ---- chunks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    blob: str
    index: int
    count: int
    size: int
    sha256: str
    meta: dict[str, Any]
    data: bytes


def frame(
    blob_id: str, index: int, count: int, size: int, digest: str, meta: Mapping[str, Any], data: bytes
) -> bytes:
    """One chunk of a blob as a frame (see the module docstring)."""
    header = canonical_json(
        {"blob": blob_id, "i": index, "n": count, "size": size, "sha256": digest, "meta": dict(meta)}
    )
    return MAGIC + _LEN.pack(len(header)) + header + data


def split_blob(blob_id: str, data: bytes, meta: Mapping[str, Any], chunk_bytes: int) -> list[bytes]:
    """The frames of one blob, each carrying at most ``chunk_bytes`` of data."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    count = max(1, math.ceil(len(data) / chunk_bytes))
    if count > MAX_CHUNKS or len(data) > MAX_BLOB_BYTES:
        raise ValueError(f"blob of {len(data)} bytes is too large to send")
    digest = sha256_hex(data)
    return [
        frame(blob_id, i, count, len(data), digest, meta, data[i * chunk_bytes : (i + 1) * chunk_bytes])
        for i in range(count)
    ]


def parse_chunk(frame: bytes, max_size: int = MAX_BLOB_BYTES, max_chunks: int = MAX_CHUNKS) -> Chunk:
    """One frame, checked for shape (not yet for the blob's hash: that needs every chunk). The
    limits are those of blobs held in memory; a file written chunk by chunk (a bundle) has wider ones."""
    if len(frame) < len(MAGIC) + _LEN.size or not frame.startswith(MAGIC):
        raise WireError("bad_frame", "not an edge-agent chunk (bad magic)")
    (hlen,) = _LEN.unpack_from(frame, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(frame):
        raise WireError("bad_frame", f"chunk header length {hlen} does not fit the frame")
    try:
        header = json.loads(frame[start : start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError("bad_frame", f"chunk header is not JSON: {e}") from e
    except RecursionError:
        raise WireError("bad_frame", "chunk header nests too deeply") from None
    if not isinstance(header, dict):
        raise WireError("bad_frame", "chunk header is not a JSON object")
    blob, i, n, size, digest, meta = (
        header.get("blob"),
        header.get("i"),
        header.get("n"),
        header.get("size"),
        header.get("sha256"),
        header.get("meta"),
    )
    if not isinstance(blob, str) or not 0 < len(blob) <= MAX_ID_CHARS:
        raise WireError("bad_frame", "chunk header: blob must be a short string")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (i, n, size)):
        raise WireError("bad_frame", "chunk header: i, n and size must be integers")
    assert isinstance(i, int) and isinstance(n, int) and isinstance(size, int)
    if not (0 < n <= max_chunks and 0 <= i < n and 0 <= size <= max_size):
        raise WireError("bad_frame", f"chunk header: chunk {i} of {n}, size {size} out of range")
    if not isinstance(digest, str) or len(digest) != 64:
        raise WireError("bad_frame", "chunk header: sha256 must be 64 hex digits")
    if not isinstance(meta, dict):
        raise WireError("bad_frame", "chunk header: meta must be a JSON object")
    return Chunk(blob, i, n, size, digest, meta, bytes(frame[start + hlen :]))


def join_chunks(chunks: Mapping[int, Chunk]) -> tuple[dict[str, Any], bytes]:
    """The whole blob from all its chunks, checked: count, consistent headers, size and sha256."""
    if not chunks:
        raise WireError("incomplete", "no chunks")
    first = next(iter(chunks.values()))
    if sorted(chunks) != list(range(first.count)):
        raise WireError("incomplete", f"have chunks {sorted(chunks)[:8]} of {first.count}")
    for c in chunks.values():
        if (c.blob, c.count, c.size, c.sha256, c.meta) != (
            first.blob,
            first.count,
            first.size,
            first.sha256,
            first.meta,
        ):
            raise WireError(
                "mixed_chunks", f"chunk {c.index} disagrees with chunk {first.index} of blob {first.blob}"
            )
    data = b"".join(chunks[i].data for i in range(first.count))
    if len(data) != first.size:
        raise WireError("truncated", f"blob {first.blob}: {len(data)} bytes, header says {first.size}")
    if sha256_hex(data) != first.sha256:
        raise WireError("bad_hash", f"blob {first.blob}: sha256 does not match (tampered or corrupted)")
    return first.meta, data


@dataclass
class _Partial:
    chunks: dict[int, Chunk] = field(default_factory=dict)
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collects chunks in memory until a blob is whole. Bounded: at most ``max_blobs`` partial blobs
    and ``max_bytes`` held; the oldest partial blob gives way (its sender resends)."""

    def __init__(self, max_blobs: int = 8, max_bytes: int = 4 * MAX_BLOB_BYTES // 8):
        self.max_blobs = max_blobs
        self.max_bytes = max_bytes
        self._partials: dict[str, _Partial] = {}

    def add(self, chunk: Chunk) -> tuple[dict[str, Any], bytes] | None:
        """The blob once its last chunk arrives (raises WireError if it does not check out), else None."""
        p = self._partials.get(chunk.blob)
        if p is None:
            p = self._partials[chunk.blob] = _Partial()
        if chunk.index not in p.chunks:
            p.bytes += len(chunk.data)
        p.chunks[chunk.index] = chunk
        if len(p.chunks) == chunk.count:
            del self._partials[chunk.blob]
            return join_chunks(p.chunks)
        self._evict()
        return None

    def _evict(self) -> None:
        while self._partials and (
            len(self._partials) > self.max_blobs
            or sum(p.bytes for p in self._partials.values()) > self.max_bytes
        ):
            oldest = min(self._partials, key=lambda b: self._partials[b].started)
            del self._partials[oldest]

    def pending(self) -> dict[str, tuple[int, int]]:
        """blob -> (chunks held, chunks expected)."""
        return {b: (len(p.chunks), next(iter(p.chunks.values())).count) for b, p in self._partials.items()}
