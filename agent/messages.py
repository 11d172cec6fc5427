"""Inbound MQTT payloads: size limits, UTF-8 and JSON decoding, schemas. Pure: no paho, no I/O.

``parse(kind, payload)`` returns a validated model or raises ``MessageError`` with an
``ErrorCode``; nothing else escapes it, whatever the bytes (a property test checks this).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.config import ConfigError, RuntimeConfig, format_errors, parse_runtime
from agent.topics import Kind

MAX_TEXT_CHARS = 4096
MAX_TEXTS = 256
MAX_ID_CHARS = 128
MAX_LABEL_CHARS = 128
MAX_ENTITIES = 512  # spans in one sample
MAX_PAYLOAD_BYTES: dict[Kind, int] = {
    Kind.INFER: 1024 * 1024,
    Kind.ENTITIES: 1024 * 1024,
    Kind.EVENT: 32 * 1024,
    Kind.SAMPLE: 32 * 1024,
    Kind.FEEDBACK: 4 * 1024,
    Kind.CONFIG: 64 * 1024,
    Kind.COMMAND: 16 * 1024,
}
# A bound on JSON nesting, well below Python's recursion limit.
MAX_JSON_DEPTH = 32


class ErrorCode(StrEnum):
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    INVALID_PAYLOAD = "invalid_payload"
    OVERSIZE = "oversize"
    UNKNOWN_LABEL = "unknown_label"
    UNKNOWN_PREDICTION = "unknown_prediction"
    UNKNOWN_COMMAND = "unknown_command"
    NOT_AVAILABLE = "not_available"
    STALE_VERSION = "stale_version"
    VERSION_CONFLICT = "version_conflict"
    STORAGE = "storage_error"
    INFERENCE = "inference_error"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal_error"


class MessageError(Exception):
    """A message that cannot be accepted: ``code`` for counters, ``message`` for people."""

    def __init__(
        self, code: ErrorCode, message: str, request_id: str | None = None, details: list[str] | None = None
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details or []

    def payload(self, **extra: Any) -> dict[str, Any]:
        return error_payload(self.code, self.message, self.request_id, **extra)


def error_payload(
    code: ErrorCode, message: str, request_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"id": request_id, **extra, "error": {"code": str(code), "message": message}}


# ---- field types ----------------------------------------------------------------------------


def _no_nul(value: str) -> str:
    # Unpaired surrogates ("\ud800" escapes) pydantic rejects itself; NUL cuts C strings short.
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


def _clean_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return _no_nul(value)


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_clean_text)]
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS), AfterValidator(_clean_text)
]
# Printable ASCII without spaces: ids end up in logs, topics of replies and SQLite keys.
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[!-~]+$")]
Timestamp = Annotated[float, Field(ge=0, le=1e11, description="seconds since the epoch")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class InferRequest(_Message):
    id: Id = Field(description="request id, echoed in the response")
    text: Text | None = Field(None, description="one text to classify")
    texts: list[Text] | None = Field(None, min_length=1, max_length=MAX_TEXTS, description="several texts")

    @model_validator(mode="after")
    def _one_of(self) -> InferRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of text or texts")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class EntityRequest(InferRequest):
    """``entities/req``: the texts whose entity spans are asked for; the shape and limits of ``infer/req``."""


class Event(_Message):
    id: Id | None = Field(
        None, description="record id, used as the prediction id (default: a hash of the payload)"
    )
    text: Text = Field(description="the record to classify")
    ts: Timestamp | None = Field(None, description="when the record was made")
    source: Annotated[str, StringConstraints(max_length=128), AfterValidator(_no_nul)] | None = Field(
        None, description="machine or gateway that produced the record"
    )


class Sample(_Message):
    """A labeled text: a ``label`` for a classifier, or ``entities`` (spans) for a token-classification
    box. The spans' offsets, labels and overlaps are checked by the handler against the serving
    bundle's entity labels (``agent.entities.validate_spans``), which knows them."""

    id: Id | None = Field(None, description="sample id; a redelivered sample with the same id is stored once")
    text: Text = Field(description="the text")
    # Before label: label's check below sees whether entities were given.
    entities: list[JsonValue] | None = Field(
        None,
        max_length=MAX_ENTITIES,
        description="its entities: [{start, end, label, text?}], character offsets, end exclusive",
    )
    label: Label | None = Field(
        None, validate_default=True, description="its label: one of the model's labels"
    )
    ts: Timestamp | None = Field(None, description="when the sample was labeled")

    @field_validator("label")
    @classmethod
    def _label_unless_entities(cls, label: str | None, info: ValidationInfo) -> str | None:
        # Reported as before entities existed, so a label sample without its label reads the same.
        # Entities that failed their own check are not in info.data: their error says enough.
        if label is None and "entities" in info.data and info.data["entities"] is None:
            raise PydanticCustomError("missing", "Field required")
        return label

    @model_validator(mode="after")
    def _not_both(self) -> Sample:
        if self.label is not None and self.entities is not None:
            raise ValueError("give either label (the text's class) or entities (its spans), not both")
        return self

    def key(self, spans: Sequence[tuple[int, int, str]] | None = None) -> str:
        """The de-duplication key: the id, or (without one) the content. A span sample's content is
        its text and ``spans``, its entities as ``agent.entities.validate_spans`` returns them."""
        if self.id is not None:
            return "id:" + self.id
        if self.entities is None:
            return "sha256:" + hashlib.sha256(f"{self.text}\x00{self.label}".encode()).hexdigest()
        if spans is None:
            raise ValueError("a span sample's key needs its validated spans")
        # Texts and labels hold no NUL: this cannot hash like a label sample, whatever its label.
        content = f"{self.text}\x00entities\x00{canonical_spans(spans)}"
        return "sha256:" + hashlib.sha256(content.encode()).hexdigest()


def canonical_spans(spans: Sequence[tuple[int, int, str]]) -> str:
    """``[[start, end, label], ...]`` as compact JSON: how span samples are keyed and stored."""
    return json.dumps([[start, end, label] for start, end, label in spans], separators=(",", ":"))


class Feedback(_Message):
    id: Id | None = Field(None, description="feedback id; a redelivered one with the same id is stored once")
    prediction_id: Id = Field(description="id of an earlier prediction (published on predictions)")
    label: Label = Field(description="the right label for it: one of the model's labels")

    def key(self) -> str:
        if self.id is not None:
            return "id:" + self.id
        return f"prediction:{self.prediction_id}:{self.label}"


class Command(_Message):
    id: Id = Field(
        description="command id, echoed in the result; a redelivered id is answered from the audit"
    )
    cmd: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,31}$")] = Field(description="command name")
    args: dict[str, JsonValue] = Field(default_factory=dict, description="command arguments")


MODELS: dict[Kind, type[BaseModel]] = {
    Kind.INFER: InferRequest,
    Kind.ENTITIES: EntityRequest,
    Kind.EVENT: Event,
    Kind.SAMPLE: Sample,
    Kind.FEEDBACK: Feedback,
    Kind.COMMAND: Command,
}

Parsed = InferRequest | Event | Sample | Feedback | Command | RuntimeConfig


# ---- decoding -------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# One decoder for every message (json.loads with hooks would build a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _depth(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


def decode_json(payload: bytes, limit: int) -> Any:
    """Bytes to a JSON value: size limit, strict UTF-8, no NaN/Infinity, bounded nesting."""
    if len(payload) > limit:
        raise MessageError(ErrorCode.OVERSIZE, f"payload is {len(payload)} bytes; the limit is {limit}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MessageError(
            ErrorCode.INVALID_UTF8, f"payload is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise MessageError(ErrorCode.INVALID_JSON, "payload nests too deeply") from None
    except ValueError as e:
        raise MessageError(ErrorCode.INVALID_JSON, f"payload is not JSON: {e}") from None
    # Nesting needs a bracket per level: only a payload with many of them can be too deep.
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH and not _depth(value, MAX_JSON_DEPTH):
        raise MessageError(ErrorCode.INVALID_JSON, f"payload nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def request_id(value: Any) -> str | None:
    """The ``id`` of a payload that failed validation, when it has a usable one (for the reply)."""
    if isinstance(value, dict):
        rid = value.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS and rid.isascii() and rid.isprintable():
            return rid
    return None


def parse(kind: Kind, payload: bytes) -> Parsed:
    """Validate one inbound payload. Raises MessageError, and nothing else."""
    value = decode_json(payload, MAX_PAYLOAD_BYTES[kind])
    if kind is Kind.CONFIG:
        try:
            return parse_runtime(value)
        except ConfigError as e:
            version = value.get("version") if isinstance(value, dict) else None
            vid = str(version) if isinstance(version, int) and not isinstance(version, bool) else None
            raise MessageError(ErrorCode.INVALID_PAYLOAD, "; ".join(e.errors), vid, e.errors) from None
    try:
        return MODELS[kind].model_validate(value)  # type: ignore[return-value]
    except ValidationError as e:
        errors = format_errors(e)
        raise MessageError(ErrorCode.INVALID_PAYLOAD, "; ".join(errors), request_id(value), errors) from None


def event_id(event: Event, payload: bytes) -> str:
    """A record without an id gets one from its bytes, so a redelivered copy maps to the same row."""
    return event.id if event.id is not None else "e-" + hashlib.sha256(payload).hexdigest()[:24]
