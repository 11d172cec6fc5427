"""``python -m tools.bench.crf``: the entity baseline a practitioner tries first, a linear-chain CRF.

`CrfBaseline` is ``sklearn_crfsuite.CRF`` (L-BFGS, c1 = c2 = 0.1, 100 iterations, all transitions)
over hand-made word features: the lower-cased word, 2- and 3-letter suffixes and prefix, case and
digit flags, hyphen, a collapsed word shape, and the same for the neighbours at +-1 and +-2. Words
come from a regex tokenizer that keeps character offsets; spans become BIO tags for training and
predicted tags become character spans again, so it fits and predicts `(start, end, label)` spans.

Protocol (simulated): one `tools.workorders.WorkOrderStream` drifting at the midpoint; the CRF
trains on the first 70 % of the pre-drift half, is scored on the rest of that half (pre-drift test)
and on the drifted half (post-drift test). Micro F1 over exact `(start, end, label)` spans.

    python -m tools.bench.crf --n 4000 --seed 0

``sklearn-crfsuite`` is a dev dependency; it is imported when a model is fitted.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["CrfBaseline", "tokenize", "spans_to_bio", "bio_to_spans", "word_features", "main"]

log = logging.getLogger(__name__)

Span = tuple[int, int, str]

# A word is a run of letters/digits that may continue across ' - . (and a comma between digits):
# "P-101", "6205-2RS", "chk'd", "2.5", "2,5" stay one token; any other character is a token alone.
_TOKEN_RE = re.compile(r"[^\W_]+(?:(?:[-'’.]|(?<=\d),(?=\d))[^\W_]+)*|\S")


def tokenize(text: str) -> list[tuple[int, int]]:
    """`(start, end)` character offsets of the words of `text`."""
    return [m.span() for m in _TOKEN_RE.finditer(text)]


def spans_to_bio(tokens: Sequence[tuple[int, int]], spans: Iterable[Span]) -> list[str]:
    """BIO tags for `tokens`: a token is inside a span when it overlaps it (first token B-, rest I-)."""
    tags = ["O"] * len(tokens)
    for start, end, label in sorted(spans):
        inside = [i for i, (s, e) in enumerate(tokens) if s < end and e > start]
        for k, i in enumerate(inside):
            tags[i] = ("B-" if k == 0 else "I-") + label
    return tags


def bio_to_spans(tokens: Sequence[tuple[int, int]], tags: Sequence[str]) -> list[Span]:
    """Character spans from BIO tags; an I- tag that does not continue its label starts a span."""
    spans: list[Span] = []
    current: list[Any] | None = None  # [start, end, label]
    for (start, end), tag in zip(tokens, tags, strict=True):
        prefix, _, label = tag.partition("-")
        if prefix == "I" and current is not None and current[2] == label:
            current[1] = end
            continue
        if current is not None:
            spans.append((current[0], current[1], current[2]))
            current = None
        if prefix in ("B", "I") and label:
            current = [start, end, label]
    if current is not None:
        spans.append((current[0], current[1], current[2]))
    return spans


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
    """The CRF's features of the i-th word of a sentence."""
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


def _sentence_features(text: str, tokens: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    words = [text[s:e] for s, e in tokens]
    return [word_features(words, i) for i in range(len(words))]


class CrfBaseline:
    """A linear-chain CRF on word features that fits and predicts character spans."""

    def __init__(
        self,
        c1: float = 0.1,
        c2: float = 0.1,
        max_iterations: int = 100,
        all_possible_transitions: bool = True,
    ) -> None:
        self.c1, self.c2 = c1, c2
        self.max_iterations = max_iterations
        self.all_possible_transitions = all_possible_transitions
        self._crf: Any = None

    def fit(self, examples: Iterable[tuple[str, Iterable[Span]]]) -> CrfBaseline:
        """Train on `(text, spans)` pairs; returns self."""
        import sklearn_crfsuite  # dev dependency, only the baseline needs it

        xs, ys = [], []
        for text, spans in examples:
            tokens = tokenize(text)
            if not tokens:
                continue
            xs.append(_sentence_features(text, tokens))
            ys.append(spans_to_bio(tokens, spans))
        if not xs:
            raise ValueError("no non-empty texts to fit on")
        crf = sklearn_crfsuite.CRF(
            algorithm="lbfgs",
            c1=self.c1,
            c2=self.c2,
            max_iterations=self.max_iterations,
            all_possible_transitions=self.all_possible_transitions,
        )
        crf.fit(xs, ys)
        self._crf = crf
        return self

    def predict(self, texts: Iterable[str]) -> list[list[Span]]:
        """Predicted `(start, end, label)` spans of each text."""
        if self._crf is None:
            raise RuntimeError("fit the CRF before predicting")
        texts = list(texts)
        tokens = [tokenize(text) for text in texts]
        out: list[list[Span]] = [[] for _ in texts]
        nonempty = [i for i, t in enumerate(tokens) if t]
        if nonempty:
            tags = self._crf.predict([_sentence_features(texts[i], tokens[i]) for i in nonempty])
            for i, sentence_tags in zip(nonempty, tags, strict=True):
                out[i] = bio_to_spans(tokens[i], sentence_tags)
        return out


def entity_f1(gold: Sequence[Sequence[Span]], pred: Sequence[Sequence[Span]]) -> float:
    """Micro F1 over exact `(start, end, label)` spans (`agent.entities.span_f1`, seqeval's convention)."""
    from agent.entities import span_f1

    return float(span_f1(gold, pred)["f1"])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench.crf", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000, help="work orders in the stream (drift at n/2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--train-fraction", type=float, default=0.7, help="of the pre-drift half")
    p.add_argument("--c1", type=float, default=0.1)
    p.add_argument("--c2", type=float, default=0.1)
    p.add_argument("--max-iterations", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.bench.crf`."""
    from tools.workorders import workorder_dataset

    args = _parser().parse_args(argv)
    data = workorder_dataset(args.n, seed=args.seed, sites=args.sites, drift=True)
    pre = [wo for wo in data if not wo.drifted]
    post = [wo for wo in data if wo.drifted]
    cut = int(len(pre) * args.train_fraction)
    train, pre_test = pre[:cut], pre[cut:]
    started = time.perf_counter()
    crf = CrfBaseline(args.c1, args.c2, args.max_iterations).fit((wo.text, wo.entities) for wo in train)
    fit_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "n_train": len(train),
        "n_pre_test": len(pre_test),
        "n_post_test": len(post),
        "fit_s": round(fit_s, 2),
    }
    for name, part in (("f1_pre_drift", pre_test), ("f1_post_drift", post)):
        pred = crf.predict(wo.text for wo in part)
        result[name] = round(entity_f1([wo.entities for wo in part], pred), 4)
    print(
        f"CRF (c1={args.c1}, c2={args.c2}, {args.max_iterations} it) trained on {len(train)} pre-drift work orders"
        f" in {fit_s:.1f}s: F1 pre-drift test {result['f1_pre_drift']:.3f} (n={len(pre_test)}),"
        f" post-drift test {result['f1_post_drift']:.3f} (n={len(post)})"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
