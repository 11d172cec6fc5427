"""The box's fast entity learner: a linear-chain CRF on hand-made word features (python-crfsuite).

What the classifier's fast learner (``agent.linear``) is to labels, this is to spans: refit from
SQLite in seconds each round, saved in the adapter's directory, scored on the holdout beside the
transformer, and served where the gate finds it better (``serving.json`` says ``crf``). It is the
model a practitioner tries first on work orders (the NER benchmark's baseline is the same features
through ``sklearn_crfsuite``), so the box is never worse than it on its own data.

Words come from a regex tokenizer that keeps character offsets; spans become BIO tags for training
and predicted tags become character spans again. A span's score is the mean marginal probability
of its words' tags. No torch: it runs on the inference path.

A crfsuite model file is parsed by C code that crashes on a crafted file, so the file is opened
only when its SHA-256 matches the one the learner recorded beside it (``crf_config.json``): a
corrupt or truncated file is refused, never opened. Only the box's own learner writes these files:
a fleet's global adapter is written on the box from its tensors (``agent.fed.spec.write_adapter_dir``)
and carries none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.entities import Span, TagScheme

CRF_MODEL = "crf_model.crfsuite"
CRF_CONFIG = "crf_config.json"
# The combination's weight on the transformer (0: the CRF alone, 1: the transformer alone): a
# geometric mean, fixed, so the holdout that judges it did not also choose it.
COMBINE_WEIGHT = 0.5
_FLOOR = 1e-6  # a probability no tag falls below: log(0) would veto a tag one model never saw

SpanTuple = tuple[int, int, str]

# A word is a run of letters/digits that may continue across ' - . (and a comma between digits):
# "P-101", "6205-2RS", "chk'd", "2.5", "2,5" stay one token; any other character is a token alone.
_TOKEN_RE = re.compile(r"[^\W_]+(?:(?:[-'’.]|(?<=\d),(?=\d))[^\W_]+)*|\S")


class CrfError(ValueError):
    """A CRF in an adapter directory that cannot be used (missing, altered, wrong labels)."""


def tokenize(text: str) -> list[tuple[int, int]]:
    """`(start, end)` character offsets of the words of `text`."""
    return [m.span() for m in _TOKEN_RE.finditer(text)]


def spans_to_bio(tokens: Sequence[tuple[int, int]], spans: Iterable[SpanTuple]) -> list[str]:
    """BIO tags for `tokens`: a token is inside a span when it overlaps it (first token B-, rest I-)."""
    tags = ["O"] * len(tokens)
    for start, end, label in sorted(spans):
        inside = [i for i, (s, e) in enumerate(tokens) if s < end and e > start]
        for k, i in enumerate(inside):
            tags[i] = ("B-" if k == 0 else "I-") + label
    return tags


def bio_to_spans(tokens: Sequence[tuple[int, int]], tags: Sequence[str]) -> list[SpanTuple]:
    """Character spans from BIO tags; an I- tag that does not continue its label starts a span."""
    return [(s, e, label) for s, e, label, _ in _bio_groups(tokens, tags)]


def _bio_groups(
    tokens: Sequence[tuple[int, int]], tags: Sequence[str]
) -> list[tuple[int, int, str, list[int]]]:
    """(start, end, label, token indices) of each span the tags make."""
    groups: list[tuple[int, int, str, list[int]]] = []
    current: list[Any] | None = None  # [start, end, label, indices]
    for i, ((start, end), tag) in enumerate(zip(tokens, tags, strict=True)):
        prefix, _, label = tag.partition("-")
        if prefix == "I" and current is not None and current[2] == label:
            current[1] = end
            current[3].append(i)
            continue
        if current is not None:
            groups.append((current[0], current[1], current[2], current[3]))
            current = None
        if prefix in ("B", "I") and label:
            current = [start, end, label, [i]]
    if current is not None:
        groups.append((current[0], current[1], current[2], current[3]))
    return groups


def _shape(word: str) -> str:
    shape = re.sub(r"[A-Z]", "X", word)
    shape = re.sub(r"[a-z]", "x", shape)
    shape = re.sub(r"\d", "d", shape)
    return re.sub(r"(.)\1+", r"\1\1", shape)  # "XXXX-dddd" -> "XX-dd": the family, not the length


def _word(word: str, prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}lower": word.lower(),
        f"{prefix}isupper": word.isupper(),
        f"{prefix}istitle": word.istitle(),
        f"{prefix}shape": _shape(word),
    }


def word_features(words: Sequence[str], i: int) -> dict[str, Any]:
    """The CRF's features of the i-th word of a sentence: the lower-cased word, 2- and 3-letter
    suffixes and prefix, case and digit flags, hyphen, a collapsed word shape, and the same for the
    neighbours at +-1 and +-2."""
    word = words[i]
    features: dict[str, Any] = {
        "bias": 1.0,
        "lower": word.lower(),
        "suffix3": word[-3:].lower(),
        "suffix2": word[-2:].lower(),
        "prefix3": word[:3].lower(),
        "isupper": word.isupper(),
        "istitle": word.istitle(),
        "isdigit": word.isdigit(),
        "hasdigit": any(c.isdigit() for c in word),
        "hashyphen": "-" in word,
        "shape": _shape(word),
        "length": min(len(word), 8),
    }
    for offset in (-2, -1, 1, 2):
        j = i + offset
        if 0 <= j < len(words):
            features.update(_word(words[j], f"{offset:+d}:"))
            if abs(offset) == 1:
                features[f"{offset:+d}:suffix3"] = words[j][-3:].lower()
        else:
            features[f"{offset:+d}:edge"] = True  # BOS/EOS
    return features


def sentence_features(text: str, tokens: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    words = [text[s:e] for s, e in tokens]
    return [word_features(words, i) for i in range(len(words))]


@dataclass
class CrfConfig:
    labels: list[str]  # the bundle's entity labels
    sha256: str = ""  # of the model file: checked before the file is opened
    version: str = ""
    samples: int = 0
    c1: float = 0.1
    c2: float = 0.1
    max_iterations: int = 100
    metrics: dict[str, Any] = field(default_factory=dict)  # holdout F1 per slice, for reports


class EntityCrf:
    """A trained CRF: ``predict`` gives each text's spans (``agent.entities.Span``, by start)."""

    def __init__(self, model: bytes, config: CrfConfig):
        import pycrfsuite

        self.model, self.config = model, config
        self._tagger = pycrfsuite.Tagger()
        self._tagger.open_inmemory(model)

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def predict(self, texts: Iterable[str]) -> list[tuple[Span, ...]]:
        out: list[tuple[Span, ...]] = []
        for text in texts:
            tokens = tokenize(text)
            if not tokens:
                out.append(())
                continue
            tags = self._tagger.tag(sentence_features(text, tokens))
            spans = []
            for start, end, label, idx in _bio_groups(tokens, tags):
                score = sum(self._tagger.marginal(tags[i], i) for i in idx) / len(idx)
                spans.append(Span(label, start, end, text[start:end], float(score)))
            out.append(tuple(spans))
        return out

    def predict_tuples(self, texts: Iterable[str]) -> list[list[SpanTuple]]:
        return [[(s.start, s.end, s.label) for s in spans] for spans in self.predict(texts)]

    def combine(
        self,
        text: str,
        token_offsets: Sequence[tuple[int, int]],
        token_probs: np.ndarray,
        scheme: TagScheme,
        weight: float = COMBINE_WEIGHT,
    ) -> tuple[Span, ...]:
        """The spans of the CRF and the transformer together: per CRF word, the weighted geometric
        mean of the CRF's tag marginals and the transformer's tag probabilities of the word's first
        token (BILOU folded into BIO: U- is a B-, L- an I-), renormalised; the best tag per word,
        then spans as the CRF's own. ``token_offsets``/``token_probs``: the transformer's content
        tokens (``agent.entities.token_probabilities``)."""
        tokens = tokenize(text)
        if not tokens:
            return ()
        bio = ["O", *(f"{p}-{label}" for label in scheme.labels for p in ("B", "I"))]
        index = {tag: i for i, tag in enumerate(bio)}
        self._tagger.set(sentence_features(text, tokens))
        known = set(self._tagger.labels())
        crf = np.full((len(tokens), len(bio)), _FLOOR)
        for tag in known & set(bio):
            col = index[tag]
            for i in range(len(tokens)):
                crf[i, col] = max(self._tagger.marginal(tag, i), _FLOOR)
        fold = np.zeros((len(scheme.tags), len(bio)))
        for t, tag in enumerate(scheme.tags):
            prefix, label = scheme.parse(tag)
            fold[t, index["O" if prefix == "O" else f"{'B' if prefix in ('B', 'U') else 'I'}-{label}"]] = 1.0
        model = np.full((len(tokens), len(bio)), 1.0 / len(bio))
        starts = [start for start, _ in token_offsets]
        k = 0
        for i, (start, end) in enumerate(tokens):
            while k < len(starts) and token_offsets[k][1] <= start:
                k += 1
            if k < len(starts) and starts[k] < end:  # the word's first token
                model[i] = np.maximum(token_probs[k] @ fold, _FLOOR)
        log_p = (1.0 - weight) * np.log(crf) + weight * np.log(model)
        probs = np.exp(log_p - log_p.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        tags = [bio[b] for b in best]
        return tuple(
            Span(label, start, end, text[start:end], float(np.mean([probs[i, best[i]] for i in idx])))
            for start, end, label, idx in _bio_groups(tokens, tags)
        )


def fit_crf(
    texts: Sequence[str],
    spans: Sequence[Sequence[SpanTuple]],
    labels: Sequence[str],
    c1: float = 0.1,
    c2: float = 0.1,
    max_iterations: int = 100,
) -> EntityCrf:
    """L-BFGS with elastic-net (c1, c2) over all transitions, as ``sklearn_crfsuite.CRF`` with the
    baseline's settings. Raises ValueError without a non-empty text."""
    import pycrfsuite

    trainer = pycrfsuite.Trainer(verbose=False)
    n = 0
    for text, text_spans in zip(texts, spans, strict=True):
        tokens = tokenize(text)
        if tokens:
            trainer.append(sentence_features(text, tokens), spans_to_bio(tokens, text_spans))
            n += 1
    if not n:
        raise ValueError("no non-empty texts to fit the CRF on")
    trainer.set_params(
        {
            "c1": c1,
            "c2": c2,
            "max_iterations": max_iterations,
            "feature.possible_transitions": True,
        }
    )
    with tempfile.TemporaryDirectory(prefix="crf-") as tmp:
        path = os.path.join(tmp, CRF_MODEL)
        trainer.train(path)
        model = Path(path).read_bytes()
    digest = hashlib.sha256(model).hexdigest()
    return EntityCrf(
        model, CrfConfig(list(labels), digest, samples=n, c1=c1, c2=c2, max_iterations=max_iterations)
    )


def save_crf(adapter_dir: Path, crf: EntityCrf, config_only: bool = False) -> None:
    """The model file and its config (with the file's digest) into an adapter directory;
    ``config_only``: the config again (new metrics), the model file already there."""
    crf.config.sha256 = hashlib.sha256(crf.model).hexdigest()
    if not config_only:
        (Path(adapter_dir) / CRF_MODEL).write_bytes(crf.model)
    (Path(adapter_dir) / CRF_CONFIG).write_text(json.dumps(asdict(crf.config), indent=2))


def read_crf(adapter_dir: Path, labels: Sequence[str]) -> EntityCrf | None:
    """The adapter's CRF, None when it has none. Raises CrfError for one that cannot serve: a
    config that does not parse, a model whose digest differs from the config's (never opened), or
    labels the bundle lacks."""
    config_path, model_path = Path(adapter_dir) / CRF_CONFIG, Path(adapter_dir) / CRF_MODEL
    if not config_path.exists() and not model_path.exists():
        return None
    try:
        raw = json.loads(config_path.read_text())
        config = CrfConfig(**raw)
        model = model_path.read_bytes()
    except (OSError, ValueError, TypeError) as e:
        raise CrfError(f"{adapter_dir}: CRF not readable ({e})") from None
    if hashlib.sha256(model).hexdigest() != config.sha256:
        raise CrfError(f"{adapter_dir}: {CRF_MODEL} does not match its recorded SHA-256; not opened")
    unknown = sorted(set(config.labels) - set(labels))
    if unknown:
        raise CrfError(f"{adapter_dir}: CRF labels {unknown} are not the bundle's entity labels")
    try:
        return EntityCrf(model, config)
    except ValueError as e:  # python-crfsuite: "Invalid model"
        raise CrfError(f"{adapter_dir}: CRF model refused ({e})") from None
