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
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from agent.entity_crf import bio_to_spans, sentence_features, spans_to_bio, tokenize, word_features

__all__ = ["CrfBaseline", "tokenize", "spans_to_bio", "bio_to_spans", "word_features", "main"]

log = logging.getLogger(__name__)

Span = tuple[int, int, str]

# The words, their offsets and features are the product's own fast entity learner's
# (agent.entity_crf): the baseline is the same CRF as a practitioner would fit it, sklearn-crfsuite.
_sentence_features = sentence_features


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
