"""The messages of a federated round, as box and aggregator both validate them (pydantic, strict).

- ``RoundAnnouncement``: retained on ``fed/{fleet}/round``; what the round is for and how it
  aggregates (strategy, the fleet's LoRA seed when A is frozen).
- ``UploadMeta``: the ``meta`` of every chunk of an upload on ``fed/{fleet}/up/{device}``.
- ``UploadResult``: the aggregator's answer on ``fed/{fleet}/res/{device}``; the box's outbox
  keeps an upload until one arrives.
- ``GlobalManifest``: retained on ``fed/{fleet}/global``, signed (``agent.fed.signing``); names the
  sha256 of the global's bytes, which come as chunks on ``global/chunk/{i}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from agent.config import format_errors
from agent.topics import SEGMENT_PATTERN

Segment = Annotated[str, StringConstraints(pattern=SEGMENT_PATTERN)]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ShortId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MAX_MESSAGE_BYTES = 256 * 1024


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RoundAnnouncement(_Msg):
    fleet: Segment
    round: int = Field(ge=1, description="round id, increasing")
    base_hash: Hex64 = Field(description="the bundle every upload must be trained on")
    strategy: str = Field(min_length=1, max_length=64, description="agent.fed.strategies name")
    lora_seed: int | None = Field(None, ge=0, lt=2**63, description="the fleet's seed for a frozen A")
    deadline: float = Field(ge=0, description="unix time at which the round aggregates what it has")
    min_uploads: int = Field(ge=1, description="the round aggregates as soon as this many boxes uploaded")
    opened_at: float = Field(ge=0)


class UploadMeta(_Msg):
    kind: Literal["upload"] = "upload"
    fleet: Segment
    device: Segment
    upload_id: ShortId = Field(description="idempotency key: a re-sent upload counts once")
    round: int | None = Field(
        None, ge=1, description="the round the box saw open; late uploads go to the next"
    )
    base_hash: Hex64
    strategy: str = Field(min_length=1, max_length=64)
    adapter_version: ShortId
    num_examples: int = Field(ge=1, le=10**9, description="the example weight in the average")
    labels: list[Label] = Field(min_length=1, max_length=1024)
    created: float = Field(ge=0)


class UploadResult(_Msg):
    upload_id: ShortId
    status: Literal["accepted", "duplicate", "refused"]
    round: int | None = None
    late: bool = False
    code: str | None = None
    reason: str | None = None


class GlobalManifest(_Msg):
    kind: Literal["global"] = "global"
    fleet: Segment
    round: int = Field(ge=1)
    version: ShortId
    base_hash: Hex64
    strategy: str = Field(min_length=1, max_length=64)
    lora_seed: int | None = None
    labels: list[Label] = Field(min_length=1, max_length=1024)
    num_examples: int = Field(ge=0)
    participants: int = Field(ge=1)
    blob: ShortId
    sha256: Hex64
    size: int = Field(ge=0)
    chunks: int = Field(ge=1)
    created: float = Field(ge=0)
    key_id: str | None = None
    signature: str | None = None


def parse_json(payload: bytes, model: type[_Msg]) -> Any:
    """A validated model from JSON bytes; ProtocolError (with key paths) otherwise."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversize", f"{len(payload)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("invalid_json", f"not JSON: {e}") from e
    except RecursionError:
        raise ProtocolError("invalid_json", "payload nests too deeply") from None
    return validate(data, model)


def validate(data: Any, model: type[_Msg]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ProtocolError("invalid_payload", "; ".join(format_errors(e))) from None


# ---- base-model releases (agent.fed.bundles on the box, agent.fed.bundle_server at HQ) ---------

RelPath = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
]


class BundleFile(_Msg):
    path: RelPath = Field(description="relative to the bundle directory; no '..', no absolute paths")
    size: int = Field(ge=0, le=2**34)
    sha256: Hex64


class Rollout(_Msg):
    stage: Literal["canary", "all", "halted"] = Field(description="who takes the release now")
    canary: list[Segment] = Field(
        default_factory=list, max_length=10_000, description="devices of the canary stage"
    )
    percent: float = Field(
        0.0, ge=0.0, le=100.0, description="share of the fleet in the canary stage, by device hash"
    )
    reason: str | None = Field(None, max_length=2000, description="why the rollout halted")


class BundleRelease(_Msg):
    """Retained on ``fed/{fleet}/bundle``, signed: a new base model for the fleet."""

    kind: Literal["bundle"] = "bundle"
    fleet: Segment
    release: int = Field(ge=1, description="increasing: a box takes a release newer than the one it serves")
    bundle_hash: Hex64 = Field(description="sha256 over the canonical list of files (bundle_hash())")
    name: str = Field(min_length=1, max_length=200)
    base_hash: Hex64
    labels: list[Label] = Field(min_length=1, max_length=1024)
    min_agent_version: str = Field(pattern=r"^\d+(\.\d+){0,3}$")
    files: list[BundleFile] = Field(min_length=1, max_length=256)
    chunk_bytes: int = Field(ge=4096, le=1024 * 1024)
    rollout: Rollout
    created: float = Field(ge=0)
    key_id: str | None = None
    signature: str | None = None


class BundleRequest(_Msg):
    """Box → HQ on ``fed/{fleet}/bundle/req/{device}``: send me these chunks of this file."""

    bundle_hash: Hex64
    path: RelPath
    chunks: list[int] = Field(min_length=1, max_length=256)


class BundleReport(_Msg):
    """Box → HQ on ``fed/{fleet}/bundle/report/{device}``: how the release is going here."""

    device: Segment
    release: int = Field(ge=1)
    bundle_hash: Hex64
    status: Literal["downloading", "verified", "trial", "switched", "refused", "failed", "rolled_back"]
    reason: str | None = Field(None, max_length=4000)
    gate: dict[str, Any] | None = None
    ts: float = Field(ge=0)
