"""``agent.entities.decode`` against Hugging Face's token-classification pipeline: a tiny random
BERT token classifier with the default tokenizer, the pipeline's entities for each aggregation
strategy, and ours from the same model's logits, equal in label, offsets, text and score."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
from tokenizers import Encoding, Tokenizer

from agent.build import default_model_path
from agent.entities import STRATEGIES, TagScheme, decode

LABELS = ["ASSET", "COMPONENT", "FAILURE", "ACTION", "PART", "QUANTITY"]
SCHEME = TagScheme(LABELS)

ASSETS = ["Pump P-101", "compressor K-7", "Conveyor CV-12", "gearbox GB-3", "Kühlturm KT2", "press line 4"]
FAILURES = ["leaking oil", "overheated", "vibrating", "Ölstand low", "seized", "unscrewed itself", "noisy"]
ACTIONS = ["replaced", "tightened", "greased", "unscrewed", "recalibrated", "flushed"]
PARTS = ["seal kit SK-22", "M8 bolts", "bearing 6204-2RS", "V-belt", "Lagerbüchse", "O-ring"]
QUANTITIES = ["3bar", "25Nm", "2 h", "0.5mm", "120°C", "4x"]


def work_orders(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    templates = [
        "{a} {f}, {x} {p} at {q}",
        "{x} {p} on {a}; {f} again after {q}",
        "{a}: {f} -> {x} {p} ({q})",
        "Shift 2: {a} {f}. {x} {p}, checked {q}, ok",
    ]
    return [
        rng.choice(templates).format(
            a=rng.choice(ASSETS),
            f=rng.choice(FAILURES),
            x=rng.choice(ACTIONS),
            p=rng.choice(PARTS),
            q=rng.choice(QUANTITIES),
        )
        for _ in range(n)
    ]


def tiny_token_model(tags: tuple[str, ...], seed: int = 0, o_bias: float = 3.0):
    """A tiny random BERT token classifier with the default tokenizer, and that tokenizer.

    Random init gives near-equal logits for every tag; the classifier is widened so that tags
    differ between tokens, and "O" biased up so that entities and gaps between them both occur.
    """
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from tests.tiny import tiny_bert_config

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    config = tiny_bert_config(
        tokenizer.vocab_size,
        num_labels=len(tags),
        id2label=dict(enumerate(tags)),
        label2id={tag: i for i, tag in enumerate(tags)},
    )
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        model.classifier.weight.mul_(5.0)
        model.classifier.bias[0] += o_bias
    return model, tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_token_model(SCHEME.tags)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return work_orders(30, seed=11)


@dataclass
class Decoded:
    encodings: list[Encoding]
    logits: list[np.ndarray]
    # Per strategy, per text: entities as (label, start, end, text, score).
    ours: dict[str, list[list[tuple]]]
    theirs: dict[str, list[list[tuple]]]


@pytest.fixture(scope="module")
def decoded(model_and_tokenizer, texts) -> Decoded:
    """Our entities and the pipeline's from the same model, for each aggregation strategy."""
    import torch
    from transformers import pipeline

    model, hf_tokenizer = model_and_tokenizer
    # What the daemon would use: the tokenizers library on the model's tokenizer.json.
    tokenizer = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    logits = []
    encodings = []
    for text in texts:
        encoding = tokenizer.encode(text)
        inputs = hf_tokenizer(text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == encoding.ids
        with torch.no_grad():
            logits.append(model(**inputs).logits[0].numpy())
        encodings.append(encoding)
    out = Decoded(encodings, logits, ours={}, theirs={})
    for strategy in STRATEGIES:
        ner = pipeline(
            "token-classification",
            model=model,
            tokenizer=hf_tokenizer,
            aggregation_strategy=strategy,
            device="cpu",
        )
        out.theirs[strategy] = [
            [
                (e["entity_group"], e["start"], e["end"], text[e["start"] : e["end"]], float(e["score"]))
                for e in found
            ]
            for text, found in zip(texts, ner(texts), strict=True)
        ]
        out.ours[strategy] = [
            [
                (s.label, s.start, s.end, s.text, s.score)
                for s in decode(text, encoding, row, SCHEME, strategy)
            ]
            for text, encoding, row in zip(texts, encodings, logits, strict=True)
        ]
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_equals_hf_pipeline(decoded, texts, strategy):
    ours = decoded.ours[strategy]
    for text, mine, hf in zip(texts, ours, decoded.theirs[strategy], strict=True):
        assert [e[:4] for e in mine] == [e[:4] for e in hf], text
        np.testing.assert_allclose([e[4] for e in mine], [e[4] for e in hf], atol=1e-4, err_msg=text)
    # Not trivially equal: entities of several words, of several labels, on every text.
    found = [e for per_text in ours for e in per_text]
    assert len(found) >= 3 * len(texts)
    assert len({e[0] for e in found}) == len(LABELS)
    assert any(" " in e[3] for e in found)
    assert all(per_text for per_text in ours)


def test_tiny_model_exercises_what_tells_the_strategies_apart(decoded):
    ours, logits, encodings = decoded.ours, decoded.logits, decoded.encodings
    # Words whose pieces disagree on the tag: where the strategies part ways.
    disagreeing = 0
    for rows, encoding in zip(logits, encodings, strict=True):
        tags = rows.argmax(axis=1)
        words: dict[int, set[int]] = {}
        for tag, word_id in zip(tags, encoding.word_ids, strict=True):
            if word_id is not None:
                words.setdefault(word_id, set()).add(int(tag))
        disagreeing += sum(len(t) > 1 for t in words.values())
    assert disagreeing >= 10
    for a, b in [("simple", "first"), ("first", "max"), ("max", "average"), ("first", "average")]:
        differing = sum(x != y for x, y in zip(ours[a], ours[b], strict=True))
        assert differing >= 3, (a, b)
    # The word strategies start and end entities on word edges only; "simple" also inside words.
    inside_words = {strategy: 0 for strategy in STRATEGIES}
    for strategy in STRATEGIES:
        for encoding, per_text in zip(encodings, ours[strategy], strict=True):
            starts, ends = word_edges(encoding)
            inside_words[strategy] += sum(e[1] not in starts or e[2] not in ends for e in per_text)
    assert inside_words == {**inside_words, "first": 0, "max": 0, "average": 0}
    assert inside_words["simple"] >= 3


def word_edges(encoding) -> tuple[set[int], set[int]]:
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for word_id, (start, end) in zip(encoding.word_ids, encoding.offsets, strict=True):
        if word_id is not None:
            starts.setdefault(word_id, start)
            ends[word_id] = end
    return set(starts.values()), set(ends.values())
