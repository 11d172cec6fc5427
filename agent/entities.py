"""Named-entity recognition on work-order text: tags, spans, decoding, long texts, span F1.

A token-classification model tags each sub-word piece; this module turns character spans into
training labels and the model's logits back into character spans of the original text:

* ``TagScheme``: "O" at index 0, then per entity label B-/I- (BIO) or B-/I-/L-/U- (BILOU);
* ``validate_spans``: refuses annotations that cannot be trained on, with a sentence that says why;
* ``token_labels``: spans to one label id per token; the first piece of each word carries the tag,
  every other token -100 (ignored by the loss), as Hugging Face's token-classification recipe does;
* ``decode``: logits to spans with the aggregation strategies of Hugging Face's token-classification
  pipeline ("simple", "first", "max", "average"; tests/integration/test_entities_vs_hf.py holds
  them equal);
* ``windows`` / ``merge_windows``: texts longer than the model's window, cut with a stride and each
  token taken from the window where it has the most context;
* ``span_f1``: exact span and label match, seqeval's convention.

It runs on the inference path: numpy and ``tokenizers`` only, no torch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tokenizers import Encoding, Tokenizer

# Label id of tokens the loss ignores (PyTorch's CrossEntropyLoss default ignore_index).
IGNORE = -100
STRATEGIES = ("simple", "first", "max", "average")
SCHEMES = ("BIO", "BILOU")

SpanTuple = tuple[int, int, str]
Strategy = Literal["simple", "first", "max", "average"]


class SpanError(ValueError):
    """Entity annotations that cannot be used; the message says which entry and why."""


class TagScheme:
    """The tag set of one entity task: "O" at index 0, then each label's prefixes, label by label."""

    def __init__(self, labels: Sequence[str], kind: Literal["BIO", "BILOU"] = "BIO") -> None:
        if kind not in SCHEMES:
            raise ValueError(f"tag scheme must be one of {', '.join(SCHEMES)}, got {kind!r}")
        if not labels:
            raise ValueError("a tag scheme needs at least one entity label")
        for label in labels:
            if not isinstance(label, str) or not label or label == "O" or label != label.strip():
                raise ValueError(
                    f"entity labels must be non-empty strings without surrounding spaces, other than 'O', "
                    f"got {label!r}"
                )
        if len(set(labels)) != len(labels):
            raise ValueError(f"entity labels must be distinct, got {list(labels)}")
        self.kind = kind
        self.labels: tuple[str, ...] = tuple(labels)
        self.prefixes: tuple[str, ...] = ("B", "I") if kind == "BIO" else ("B", "I", "L", "U")
        self.tags: tuple[str, ...] = ("O", *(f"{p}-{label}" for label in self.labels for p in self.prefixes))
        self.tag_to_id: dict[str, int] = {tag: i for i, tag in enumerate(self.tags)}
        self._parsed = [("O", "")] + [(p, label) for label in self.labels for p in self.prefixes]

    def __repr__(self) -> str:
        return f"TagScheme({list(self.labels)!r}, kind={self.kind!r})"

    def parse(self, tag: str) -> tuple[str, str]:
        """("B", "PART") for "B-PART"; ("O", "") for "O"."""
        if tag not in self.tag_to_id:
            raise ValueError(f"{tag!r} is not a tag of {self!r}")
        return self._parsed[self.tag_to_id[tag]]

    def parse_id(self, tag_id: int) -> tuple[str, str]:
        return self._parsed[tag_id]

    def tag_id(self, prefix: str, label: str) -> int:
        return self.tag_to_id[f"{prefix}-{label}"]


@dataclass(frozen=True)
class Span:
    """One entity: character offsets into the original text, end exclusive."""

    label: str
    start: int
    end: int
    text: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "score": self.score,
        }


# Keys an entity object may carry: Span.to_json() output validates back.
_ENTITY_KEYS = {"label", "start", "end", "text", "score"}


def validate_spans(text: str, entities: Any, labels: Collection[str]) -> list[SpanTuple]:
    """Entity annotations (JSON objects with label, start, end) as (start, end, label), by start.

    Leading and trailing whitespace is trimmed off each span: decoded spans never carry it, so gold
    and predicted spans compare exactly. An optional "text" must equal ``text[start:end]`` (it
    catches byte offsets given for character offsets).
    """
    if not isinstance(entities, list):
        raise SpanError(f"entities must be a list of objects, got {type(entities).__name__}")
    spans: list[tuple[int, int, str, int]] = []
    for i, entity in enumerate(entities):
        where = f"entities[{i}]"
        if not isinstance(entity, dict):
            raise SpanError(
                f"{where} must be an object with label, start and end, got {type(entity).__name__}"
            )
        missing = {"label", "start", "end"} - entity.keys()
        if missing:
            raise SpanError(f"{where} lacks {', '.join(sorted(missing))}")
        unknown = entity.keys() - _ENTITY_KEYS
        if unknown:
            raise SpanError(f"{where} has unknown keys {', '.join(sorted(map(str, unknown)))}")
        start, end, label = entity["start"], entity["end"], entity["label"]
        for name, value in (("start", start), ("end", end)):
            # bool is an int in Python; true/false as an offset is a producer bug.
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpanError(f"{where}: {name} must be an integer, got {value!r}")
        if not 0 <= start <= len(text) or not 0 <= end <= len(text):
            raise SpanError(f"{where}: [{start}, {end}) is outside the text (length {len(text)})")
        if start >= end:
            raise SpanError(f"{where}: start {start} must be before end {end}")
        if not isinstance(label, str) or label not in labels:
            raise SpanError(f"{where}: unknown label {label!r} (known: {', '.join(labels)})")
        if "text" in entity and entity["text"] != text[start:end]:
            raise SpanError(
                f"{where}: text {entity['text']!r} differs from the text at [{start}, {end}): {text[start:end]!r}"
            )
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start == end:
            raise SpanError(f"{where} covers only whitespace")
        spans.append((start, end, label, i))
    spans.sort()
    for (s0, e0, _, i0), (s1, e1, _, i1) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise SpanError(f"entities[{i0}] [{s0}, {e0}) and entities[{i1}] [{s1}, {e1}) overlap")
    return [(s, e, label) for s, e, label, _ in spans]


def _words(encoding: Encoding) -> list[tuple[int, int, int]]:
    """(first token index, start, end) of each word of the encoding, in order."""
    words: list[tuple[int, int, int]] = []
    previous: int | None = None
    for i, (word_id, special, (start, end)) in enumerate(
        zip(encoding.word_ids, encoding.special_tokens_mask, encoding.offsets, strict=True)
    ):
        if word_id is None or special:
            previous = None
            continue
        if word_id == previous:
            words[-1] = (words[-1][0], words[-1][1], end)
        else:
            words.append((i, start, end))
        previous = word_id
    return words


def token_labels(encoding: Encoding, spans: Sequence[SpanTuple], scheme: TagScheme) -> list[int]:
    """One label id per token: the first piece of each word gets its tag, all other tokens -100.

    ``spans`` as ``validate_spans`` returns them. A word belongs to the first span its characters
    overlap; it starts the entity if it holds the span's first character, so a window that opens
    inside an entity tags its first word I-, as the entity continues from before.
    """
    labels = [IGNORE] * len(encoding)
    ordered = sorted(spans)
    for index, word_start, word_end in _words(encoding):
        span = next((s for s in ordered if s[0] < word_end and word_start < s[1]), None)
        if span is None:
            labels[index] = 0
            continue
        start, end, label = span
        first, last = word_start <= start, word_end >= end
        if scheme.kind == "BILOU":
            prefix = "U" if first and last else "B" if first else "L" if last else "I"
        else:
            prefix = "B" if first else "I"
        labels[index] = scheme.tag_id(prefix, label)
    return labels


@dataclass(frozen=True)
class _Tokens:
    """The content tokens of one text (special tokens dropped), in order."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int]
    logits: np.ndarray  # [tokens, tags]


def _content(encoding: Encoding, logits: Any, scheme: TagScheme) -> _Tokens:
    array = np.asarray(logits, dtype=np.float64)
    if array.shape != (len(encoding), len(scheme.tags)):
        raise ValueError(
            f"logits of shape {array.shape} do not fit {len(encoding)} tokens and {len(scheme.tags)} tags"
        )
    if not np.isfinite(array).all():
        raise ValueError("logits hold NaN or infinity")
    keep: list[int] = []
    word_ids: list[int] = []
    for i, (word_id, special) in enumerate(zip(encoding.word_ids, encoding.special_tokens_mask, strict=True)):
        if word_id is not None and not special:
            keep.append(i)
            word_ids.append(word_id)
    return _Tokens(
        ids=[encoding.ids[i] for i in keep],
        offsets=[encoding.offsets[i] for i in keep],
        word_ids=word_ids,
        logits=array[keep],
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _units(tokens: _Tokens, strategy: str) -> list[tuple[int, float, int, int]]:
    """(tag id, score, start, end) per token ("simple") or per word (the others), as HF's pipeline."""
    probs = _softmax(tokens.logits)
    if strategy == "simple":
        tags = probs.argmax(axis=-1)
        return [
            (int(tag), float(p[tag]), start, end)
            for tag, p, (start, end) in zip(tags, probs, tokens.offsets, strict=True)
        ]
    groups: list[list[int]] = []
    for i, word_id in enumerate(tokens.word_ids):
        if groups and tokens.word_ids[groups[-1][0]] == word_id:
            groups[-1].append(i)
        else:
            groups.append([i])
    units = []
    for group in groups:
        if strategy == "first":
            p = probs[group[0]]
        elif strategy == "max":
            # The first piece wins ties, as Python's max() does in HF's pipeline.
            p = probs[max(group, key=lambda i: probs[i].max())]
        else:
            p = probs[group].mean(axis=0)
        tag = int(p.argmax())
        units.append((tag, float(p[tag]), tokens.offsets[group[0]][0], tokens.offsets[group[-1]][1]))
    return units


def _decode_tokens(text: str, tokens: _Tokens, scheme: TagScheme, strategy: str) -> list[Span]:
    if strategy not in STRATEGIES:
        raise ValueError(f"aggregation strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if tokens.offsets and max(end for _, end in tokens.offsets) > len(text):
        raise ValueError("the encoding's offsets run past the text: it is not this text's encoding")
    entities: list[list[Any]] = []  # [label, start, end, scores]
    # Whether the next I-/L- of the same label extends the last entity: not after L-, U- or O.
    extendable = False
    for tag, score, start, end in _units(tokens, strategy):
        prefix, label = scheme.parse_id(tag)
        if prefix == "O":
            extendable = False
            continue
        if extendable and prefix in ("I", "L") and entities[-1][0] == label:
            entities[-1][2] = end
            entities[-1][3].append(score)
        else:
            # B-/U- start an entity; so does an I-/L- that follows no entity of its label (HF does).
            entities.append([label, start, end, [score]])
        extendable = prefix in ("B", "I")
    return [
        Span(label, start, end, text[start:end], float(np.mean(scores)))
        for label, start, end, scores in entities
    ]


def decode(
    text: str, encoding: Encoding, logits: Any, scheme: TagScheme, strategy: Strategy = "first"
) -> list[Span]:
    """Entities of one encoded text from its logits [tokens, tags], by start.

    ``strategy`` is HF's ``aggregation_strategy``: "simple" groups pieces by their own tags (a word
    may split); "first", "max" and "average" tag whole words by their first piece, their most
    confident piece, or their pieces' mean probabilities. An entity's score is the mean of its
    pieces' (simple) or words' scores.
    """
    return _decode_tokens(text, _content(encoding, logits, scheme), scheme, strategy)


def check_window_stride(tokenizer: Tokenizer) -> None:
    """Refuse a truncation stride that leaves no new tokens per window (once, at configuration)."""
    truncation = tokenizer.truncation
    if truncation is not None:
        room = truncation["max_length"] - tokenizer.num_special_tokens_to_add(False)
        # tokenizers panics on this (a BaseException that escapes `except Exception`).
        if truncation["stride"] >= room:
            raise ValueError(
                f"stride {truncation['stride']} must be less than the {room} text tokens of a "
                f"{truncation['max_length']}-token window"
            )


def windows(tokenizer: Tokenizer, text: str) -> list[Encoding]:
    """The windows that cover ``text``, as the tokenizer's truncation (max_length, stride) cuts them.

    Configure the tokenizer with ``enable_truncation(max_length, stride=stride)``; without
    truncation the whole text is one window.
    """
    check_window_stride(tokenizer)
    first = tokenizer.encode(text)
    return [first, *first.overflowing]


def _overlap(previous: list[tuple[int, int, int]], current: list[tuple[int, int, int]]) -> int:
    """How many tokens ``current`` shares with the end of ``previous``: the stride."""
    for n in range(min(len(previous), len(current)), 0, -1):
        if previous[-n:] == current[:n]:
            return n
    return 0


def merge_windows(
    text: str, encoded: Sequence[tuple[Encoding, Any]], scheme: TagScheme, strategy: Strategy = "first"
) -> list[Span]:
    """Entities of a text from its windows' (encoding, logits), in window order, decoded once.

    Each token's logits come from the window where it sits farthest from an edge (the most context
    on its nearer side; the earlier window on ties), so words and entities that a window edge cuts
    decode whole and offsets stay exact.
    """
    return _decode_tokens(text, _merged_tokens(encoded, scheme), scheme, strategy)


def token_probabilities(
    encoded: Sequence[tuple[Encoding, Any]], scheme: TagScheme
) -> tuple[list[tuple[int, int]], list[int], np.ndarray]:
    """A text's content tokens from its windows, merged as ``merge_windows`` merges them: character
    offsets, word ids, and tag probabilities [tokens, tags] (for combining with another model)."""
    tokens = _merged_tokens(encoded, scheme)
    return tokens.offsets, tokens.word_ids, _softmax(tokens.logits)


def _merged_tokens(encoded: Sequence[tuple[Encoding, Any]], scheme: TagScheme) -> _Tokens:
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    word_ids: list[int] = []
    rows: list[np.ndarray] = []
    contexts: list[int] = []  # per merged token: its context in the window its row comes from
    previous: list[tuple[int, int, int]] = []
    window_start = 0  # the merged position of the current window's first token
    for k, (encoding, logits) in enumerate(encoded):
        tokens = _content(encoding, logits, scheme)
        keys = [(i, start, end) for i, (start, end) in zip(tokens.ids, tokens.offsets, strict=True)]
        if not keys:
            continue
        shared = _overlap(previous, keys)
        if previous and shared == 0 and keys[0][1] < previous[-1][2]:
            raise ValueError(
                f"window {k} does not continue the window before it: windows of one text, in order"
            )
        window_start += len(previous) - shared
        for j, row in enumerate(tokens.logits):
            context = min(j, len(keys) - 1 - j)
            position = window_start + j
            if position == len(rows):
                ids.append(tokens.ids[j])
                offsets.append(tokens.offsets[j])
                word_ids.append(tokens.word_ids[j])
                rows.append(row)
                contexts.append(context)
            elif context > contexts[position]:
                rows[position], contexts[position] = row, context
        previous = keys
    logits = np.stack(rows) if rows else np.zeros((0, len(scheme.tags)))
    return _Tokens(ids, offsets, word_ids, logits)


def _ratio(numerator: int, denominator: int) -> float:
    # seqeval's zero_division default: 0 where nothing was predicted or nothing was there.
    return numerator / denominator if denominator else 0.0


def _scores(true_positives: int, predicted: int, support: int) -> dict[str, Any]:
    precision, recall = _ratio(true_positives, predicted), _ratio(true_positives, support)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def span_f1(gold: Sequence[Sequence[SpanTuple]], pred: Sequence[Sequence[SpanTuple]]) -> dict[str, Any]:
    """Micro precision, recall, F1 and support over texts, and the same per label under "per_label".

    A predicted span counts only if a gold span of the same text has the same start, end and label
    (seqeval's convention). Labels are those of either side, as seqeval reports them.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold texts but {len(pred)} predicted")
    counts: dict[str, list[int]] = {}  # label -> [true positives, predicted, gold]
    for gold_spans, pred_spans in zip(gold, pred, strict=True):
        gold_set, pred_set = set(gold_spans), set(pred_spans)
        for _, _, label in gold_set:
            counts.setdefault(label, [0, 0, 0])[2] += 1
        for span in pred_set:
            count = counts.setdefault(span[2], [0, 0, 0])
            count[1] += 1
            count[0] += span in gold_set
    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return {
        **_scores(*total),
        "per_label": {label: _scores(*counts[label]) for label in sorted(counts)},
    }
