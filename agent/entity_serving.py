"""Serving a token-classification bundle: texts in, entity spans out. No torch here.

The engine batches requests, caches answers and swaps adapters the same way for both task kinds;
what differs is here: a text longer than the model's window becomes several windows (the
tokenizer's own overflow with stride), every window of every text in a batch is sorted by length
and run in the engine's token-budget chunks, and each text's windows are merged token by token and
decoded into spans with character offsets into the original text (``agent.entities``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
from tokenizers import Encoding, Tokenizer

from agent.bundle import TOKENIZER_JSON, BundleManifest
from agent.entities import (
    STRATEGIES,
    Span,
    Strategy,
    TagScheme,
    check_window_stride,
    merge_windows,
    token_probabilities,
)

# Tokens shared by neighbouring windows of a long text: each token is then decoded from a window
# where it has at least this much context on its nearer side.
DEFAULT_STRIDE_FRACTION = 0.25


class Entities(tuple):
    """One text's spans (a tuple of ``Span``, by start), the adapter version that found them and
    which of its models did ("transformer" or "crf"), as a classifier's ``Prediction`` carries
    them: an answer read across a hot swap names the adapter that made it, not the one serving
    when it is published."""

    adapter_version: str | None
    model: str

    def __new__(
        cls, spans: Iterable[Span], adapter_version: str | None, model: str = "transformer"
    ) -> Entities:
        entities = super().__new__(cls, spans)
        entities.adapter_version = adapter_version
        entities.model = model
        return entities


def window_tokenizer(bundle_dir: Path, manifest: BundleManifest) -> Tokenizer:
    """The bundle's tokenizer cutting texts into windows as serving does: ``max_length`` tokens, a
    quarter-window stride, no padding. The learner trains on the same windows."""
    tok = Tokenizer.from_file(str(Path(bundle_dir) / TOKENIZER_JSON))
    tok.enable_truncation(
        manifest.max_length, stride=max(1, int(manifest.max_length * DEFAULT_STRIDE_FRACTION))
    )
    tok.no_padding()
    check_window_stride(tok)
    return tok


class SpanExtractor:
    """Texts -> windows -> (the engine runs them) -> spans, for one token-classification bundle."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, strategy: str = "first"):
        if manifest.entities is None:
            raise ValueError(f"{bundle_dir}: a token-classification manifest without entities")
        if strategy not in STRATEGIES:
            raise ValueError(f"aggregation {strategy!r} is not one of {list(STRATEGIES)}")
        self.scheme = TagScheme(manifest.entities.labels, manifest.entities.scheme)
        self.strategy = cast(Strategy, strategy)
        self._tokenizer = window_tokenizer(bundle_dir, manifest)

    def encode(self, texts: list[str]) -> list[list[Encoding]]:
        """Each text's windows (one for a text that fits): one batch call for the whole request batch."""
        return [[e, *e.overflowing] for e in self._tokenizer.encode_batch(texts)]

    def decode(
        self,
        text: str,
        encodings: list[Encoding],
        logits: list[np.ndarray],
        adapter_version: str | None = None,
    ) -> Entities:
        """One text's spans from its windows' logits ([window tokens, tags] each)."""
        return Entities(
            merge_windows(text, list(zip(encodings, logits, strict=True)), self.scheme, self.strategy),
            adapter_version,
        )

    def decode_combined(
        self,
        text: str,
        encodings: list[Encoding],
        logits: list[np.ndarray],
        crf: Any,
        adapter_version: str | None = None,
    ) -> Entities:
        """One text's spans from the transformer's windows and the unit's CRF together
        (``agent.entity_crf.EntityCrf.combine``)."""
        offsets, _, probs = token_probabilities(list(zip(encodings, logits, strict=True)), self.scheme)
        return Entities(crf.combine(text, offsets, probs, self.scheme), adapter_version, "combined")
