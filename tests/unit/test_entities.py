"""Entity spans: tag schemes, refused annotations, token labels on the default tokenizer, decoding
back to exact character offsets, long texts in windows, and span F1 against seqeval."""

from __future__ import annotations

import random

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from tokenizers import Tokenizer

from agent.build import default_model_path
from agent.entities import (
    IGNORE,
    STRATEGIES,
    Span,
    SpanError,
    TagScheme,
    decode,
    merge_windows,
    span_f1,
    token_labels,
    validate_spans,
    windows,
)

LABELS = ["ASSET", "COMPONENT", "FAILURE", "ACTION", "PART", "QUANTITY"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # The default model's tokenizer, as tests/tiny.py and the bundle builder load it.
    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def annotate(text: str, *entities: tuple[str, str]) -> list[tuple[int, int, str]]:
    """(start, end, label) of each (substring, label), each found after the one before."""
    spans, at = [], 0
    for piece, label in entities:
        start = text.index(piece, at)
        spans.append((start, start + len(piece), label))
        at = start + len(piece)
    return spans


# Multi-piece words on the default tokenizer: "p - 101" (three words), "un ##sc ##rew ##ed",
# "3 ##bar", "ol ##stand" (Ö: accents stripped, offsets still into the original text).
WORK_ORDERS = [
    (
        "Pump P-101 unscrewed at 3bar, replaced seal kit SK-22 on line 4.",
        [("Pump P-101", "ASSET"), ("unscrewed", "ACTION"), ("3bar", "QUANTITY"), ("replaced", "ACTION")]
        + [("seal kit SK-22", "PART")],
    ),
    (
        "Ölstand low on compressor K-7; bearing overheated, greased Lagerbüchse twice",
        [("Ölstand low", "FAILURE"), ("compressor K-7", "ASSET"), ("bearing", "COMPONENT")]
        + [("overheated", "FAILURE"), ("greased", "ACTION"), ("Lagerbüchse", "PART")],
    ),
    (
        "Conveyor CV-12 gearbox leaking oil, tightened M8 bolts to 25Nm",
        [("Conveyor CV-12", "ASSET"), ("gearbox", "COMPONENT"), ("leaking oil", "FAILURE")]
        + [("tightened", "ACTION"), ("M8 bolts", "PART"), ("25Nm", "QUANTITY")],
    ),
    (
        # Two entities of one label side by side: the second must start with B-.
        "Swapped motor M-3 motor M-4 after 2 h, fuse F2 F3 blown",
        [("Swapped", "ACTION"), ("motor M-3", "ASSET"), ("motor M-4", "ASSET"), ("2 h", "QUANTITY")]
        + [("fuse F2", "COMPONENT"), ("F3", "COMPONENT"), ("blown", "FAILURE")],
    ),
    ("all ok, no findings", []),
]
CASES = [(text, annotate(text, *entities)) for text, entities in WORK_ORDERS]


def tags_of(tokenizer: Tokenizer, scheme: TagScheme, text: str, spans) -> list[tuple[str, str | None]]:
    encoding = tokenizer.encode(text)
    labels = token_labels(encoding, spans, scheme)
    return [
        (token, None if label == IGNORE else scheme.tags[label])
        for token, label in zip(encoding.tokens, labels, strict=True)
    ]


def test_bio_scheme_lists_o_then_b_and_i_per_label():
    scheme = TagScheme(LABELS)
    assert scheme.tags[:5] == ("O", "B-ASSET", "I-ASSET", "B-COMPONENT", "I-COMPONENT")
    assert len(scheme.tags) == 1 + 2 * len(LABELS)
    assert [scheme.tag_to_id[t] for t in scheme.tags] == list(range(len(scheme.tags)))
    assert scheme.parse("I-QUANTITY") == ("I", "QUANTITY")
    assert scheme.parse("O") == ("O", "")
    assert scheme.tag_id("B", "PART") == scheme.tags.index("B-PART")
    with pytest.raises(ValueError, match="not a tag"):
        scheme.parse("L-PART")


def test_bilou_scheme_lists_four_prefixes_per_label():
    scheme = TagScheme(["ASSET", "PART-NO"], kind="BILOU")
    assert scheme.tags == (
        "O",
        *("B-ASSET", "I-ASSET", "L-ASSET", "U-ASSET"),
        *("B-PART-NO", "I-PART-NO", "L-PART-NO", "U-PART-NO"),
    )
    # A label may hold a dash: only the first one separates the prefix.
    assert scheme.parse("U-PART-NO") == ("U", "PART-NO")
    assert [scheme.parse_id(i) for i in range(3)] == [("O", ""), ("B", "ASSET"), ("I", "ASSET")]


@pytest.mark.parametrize(
    ("labels", "kind", "message"),
    [
        ([], "BIO", "at least one"),
        (["ASSET", "ASSET"], "BIO", "distinct"),
        (["O"], "BIO", "other than 'O'"),
        ([""], "BIO", "non-empty"),
        ([" ASSET"], "BIO", "surrounding spaces"),
        (["ASSET"], "BIOES", "BIO, BILOU"),
    ],
)
def test_scheme_refuses_bad_labels(labels, kind, message):
    with pytest.raises(ValueError, match=message):
        TagScheme(labels, kind=kind)


def test_validate_spans_sorts_trims_and_accepts_its_own_json():
    text = "Pump P-101 unscrewed at 3bar"
    entities = [
        {"label": "ACTION", "start": 10, "end": 21},  # " unscrewed " with both spaces
        {"label": "ASSET", "start": 0, "end": 10, "text": "Pump P-101"},
    ]
    assert validate_spans(text, entities, LABELS) == [(0, 10, "ASSET"), (11, 20, "ACTION")]
    span = Span("QUANTITY", 24, 28, "3bar", 0.9)
    assert validate_spans(text, [span.to_json()], LABELS) == [(24, 28, "QUANTITY")]
    assert span.to_json() == {"label": "QUANTITY", "start": 24, "end": 28, "text": "3bar", "score": 0.9}
    assert validate_spans(text, [], LABELS) == []


@pytest.mark.parametrize(
    ("entities", "message"),
    [
        ({"label": "ASSET", "start": 0, "end": 4}, r"must be a list of objects, got dict"),
        (["ASSET 0 4"], r"entities\[0\] must be an object"),
        ([{"label": "ASSET", "start": 0}], r"entities\[0\] lacks end"),
        ([{"label": "ASSET", "start": 0, "end": 4, "kind": "x"}], r"unknown keys kind"),
        ([{"label": "ASSET", "start": "0", "end": 4}], r"start must be an integer, got '0'"),
        ([{"label": "ASSET", "start": False, "end": 4}], r"start must be an integer, got False"),
        ([{"label": "ASSET", "start": 0, "end": 4.0}], r"end must be an integer, got 4.0"),
        ([{"label": "ASSET", "start": -1, "end": 4}], r"\[-1, 4\) is outside the text \(length 28\)"),
        ([{"label": "ASSET", "start": 24, "end": 29}], r"\[24, 29\) is outside the text"),
        ([{"label": "ASSET", "start": 4, "end": 4}], r"start 4 must be before end 4"),
        ([{"label": "ASSET", "start": 5, "end": 4}], r"start 5 must be before end 4"),
        ([{"label": "PUMP", "start": 0, "end": 4}], r"unknown label 'PUMP'"),
        ([{"label": 3, "start": 0, "end": 4}], r"unknown label 3"),
        ([{"label": "ASSET", "start": 4, "end": 5}], r"entities\[0\] covers only whitespace"),
        ([{"label": "ASSET", "start": 0, "end": 4, "text": "Pum"}], r"text 'Pum' differs .* 'Pump'"),
        (
            [{"label": "ASSET", "start": 0, "end": 10}, {"label": "PART", "start": 5, "end": 6}],
            r"entities\[0\] \[0, 10\) and entities\[1\] \[5, 6\) overlap",
        ),
    ],
)
def test_validate_spans_refuses_with_a_clear_sentence(entities, message):
    with pytest.raises(SpanError, match=message):
        validate_spans("Pump P-101 unscrewed at 3bar", entities, LABELS)


def test_token_labels_tag_first_pieces_and_ignore_the_rest(tokenizer):
    text, spans = CASES[0]
    assert tags_of(tokenizer, TagScheme(LABELS), text, spans) == [
        ("[CLS]", None),
        ("pump", "B-ASSET"),
        ("p", "I-ASSET"),
        ("-", "I-ASSET"),
        ("101", "I-ASSET"),
        ("un", "B-ACTION"),
        ("##sc", None),
        ("##rew", None),
        ("##ed", None),
        ("at", "O"),
        ("3", "B-QUANTITY"),
        ("##bar", None),
        (",", "O"),
        ("replaced", "B-ACTION"),
        ("seal", "B-PART"),
        ("kit", "I-PART"),
        ("sk", "I-PART"),
        ("-", "I-PART"),
        ("22", "I-PART"),
        ("on", "O"),
        ("line", "O"),
        ("4", "O"),
        (".", "O"),
        ("[SEP]", None),
    ]


def test_token_labels_bilou_marks_last_and_unit_words(tokenizer):
    text, spans = CASES[0]
    tagged = [tag for _, tag in tags_of(tokenizer, TagScheme(LABELS, kind="BILOU"), text, spans) if tag]
    assert tagged == [
        *("B-ASSET", "I-ASSET", "I-ASSET", "L-ASSET"),
        *("U-ACTION", "O", "U-QUANTITY", "O", "U-ACTION"),
        *("B-PART", "I-PART", "I-PART", "I-PART", "L-PART"),
        *("O", "O", "O", "O"),
    ]


def test_token_labels_span_inside_a_word_tags_the_whole_word(tokenizer):
    # "3" of "3bar" alone: the word carries it, as words are what the model tags.
    text = "at 3bar now"
    tagged = tags_of(tokenizer, TagScheme(LABELS, kind="BILOU"), text, [(3, 4, "QUANTITY")])
    assert tagged == [("[CLS]", None), ("at", "O"), ("3", "U-QUANTITY"), ("##bar", None), ("now", "O")] + [
        ("[SEP]", None)
    ]


def window_tokenizer(tokenizer: Tokenizer, max_length: int, stride: int) -> Tokenizer:
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length, stride=stride)
    return tok


def test_token_labels_window_opening_inside_an_entity_continues_it(tokenizer):
    text, spans = long_case()
    scheme = TagScheme(LABELS)
    opened_inside = 0
    for window in windows(window_tokenizer(tokenizer, 8, 2), text):
        labels = token_labels(window, spans, scheme)
        first = next(i for i, w in enumerate(window.word_ids) if w is not None)
        start = window.offsets[first][0]
        inside = [label for s, e, label in spans if s < start < e]
        if inside:
            opened_inside += 1
            assert scheme.tags[labels[first]] == f"I-{inside[0]}"
    assert opened_inside >= 3


def gold_logits(encoding, spans, scheme: TagScheme, pieces: str = "copy") -> np.ndarray:
    """Logits that put the gold tag on each word's first piece; continuation pieces per ``pieces``.

    "copy": the first piece's logits, which every word strategy decodes to the gold spans;
    "continue": I- of the word's entity (or O), which "simple" decodes to the gold spans (BIO);
    "noise": a confident wrong tag that only "first" and "max" see through (the first piece is
    more confident).
    """
    labels = token_labels(encoding, spans, scheme)
    rng = np.random.default_rng(len(encoding))
    logits = rng.normal(0, 0.1, (len(encoding), len(scheme.tags)))
    head = 0
    for i, label in enumerate(labels):
        if label != IGNORE:
            head = label
            logits[i, label] += 8.0
        elif encoding.word_ids[i] is not None:
            if pieces == "copy":
                logits[i] = logits[i - 1]
            elif pieces == "noise":
                logits[i, (head + 3) % len(scheme.tags)] += 5.0
            else:
                prefix, entity = scheme.parse_id(head)
                logits[i, 0 if prefix == "O" else scheme.tag_id("I", entity)] += 8.0
    return logits


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_round_trips_gold_spans_with_exact_offsets(tokenizer, strategy):
    scheme = TagScheme(LABELS)
    for text, spans in CASES:
        encoding = tokenizer.encode(text)
        logits = gold_logits(encoding, spans, scheme, "continue" if strategy == "simple" else "copy")
        decoded = decode(text, encoding, logits, scheme, strategy)
        assert [(s.start, s.end, s.label) for s in decoded] == spans
        assert [s.text for s in decoded] == [text[a:b] for a, b, _ in spans]
        assert all(0.99 < s.score <= 1.0 for s in decoded)
        assert validate_spans(text, [s.to_json() for s in decoded], LABELS) == spans


@pytest.mark.parametrize("strategy", ["first", "max"])
def test_word_strategies_see_through_noisy_continuation_pieces(tokenizer, strategy):
    scheme = TagScheme(LABELS)
    simple_differs = 0
    for text, spans in CASES:
        encoding = tokenizer.encode(text)
        logits = gold_logits(encoding, spans, scheme, pieces="noise")
        assert [(s.start, s.end, s.label) for s in decode(text, encoding, logits, scheme, strategy)] == spans
        # "simple" follows each piece's own tag, so the noise splits words.
        simple = decode(text, encoding, logits, scheme, "simple")
        simple_differs += [(s.start, s.end, s.label) for s in simple] != spans
    assert simple_differs >= 3


@pytest.mark.parametrize("strategy", ["first", "max", "average"])
def test_decode_bilou_round_trips(tokenizer, strategy):
    scheme = TagScheme(LABELS, kind="BILOU")
    for text, spans in CASES:
        encoding = tokenizer.encode(text)
        decoded = decode(text, encoding, gold_logits(encoding, spans, scheme), scheme, strategy)
        assert [(s.start, s.end, s.label) for s in decoded] == spans


def one_word_logits(tokenizer, scheme: TagScheme, text: str, tags_and_confidence):
    """Logits for ``text`` with the given (tag, logit) on each content token, in order."""
    encoding = tokenizer.encode(text)
    logits = np.zeros((len(encoding), len(scheme.tags)))
    content = [i for i, w in enumerate(encoding.word_ids) if w is not None]
    assert len(content) == len(tags_and_confidence)
    for i, (tag, value) in zip(content, tags_and_confidence, strict=True):
        logits[i, scheme.tag_to_id[tag]] = value
    return encoding, logits


def test_decode_strategies_aggregate_pieces_like_hf(tokenizer):
    scheme = TagScheme(LABELS)
    text = "unscrewed"  # un ##sc ##rew ##ed
    encoding, logits = one_word_logits(
        tokenizer, scheme, text, [("B-ACTION", 3.0), ("B-PART", 6.0), ("I-PART", 2.0), ("O", 2.0)]
    )
    probs = np.exp(logits[1:-1]) / np.exp(logits[1:-1]).sum(axis=1, keepdims=True)

    def found(strategy):
        return [
            (s.label, s.start, s.end, round(s.score, 6))
            for s in decode(text, encoding, logits, scheme, strategy)
        ]

    assert found("first") == [("ACTION", 0, 9, round(probs[0].max(), 6))]
    assert found("max") == [("PART", 0, 9, round(probs[1].max(), 6))]
    mean = probs.mean(axis=0)
    assert found("average") == [("PART", 0, 9, round(mean[scheme.tag_to_id["B-PART"]], 6))]
    # Pieces by their own tags: "un" alone, "##sc ##rew" one PART, "##ed" outside.
    assert found("simple") == [
        ("ACTION", 0, 2, round(probs[0].max(), 6)),
        ("PART", 2, 7, round((probs[1].max() + probs[2].max()) / 2, 6)),
    ]


def test_decode_starts_entities_like_hf(tokenizer):
    scheme = TagScheme(LABELS)
    text = "pump seal kit oil leak fuse"
    tags = ["I-ASSET", "B-PART", "B-PART", "O", "I-FAILURE", "I-COMPONENT"]
    encoding, logits = one_word_logits(tokenizer, scheme, text, [(t, 9.0) for t in tags])
    assert [(s.label, s.text) for s in decode(text, encoding, logits, scheme)] == [
        ("ASSET", "pump"),  # I- at the start opens an entity
        ("PART", "seal"),  # B- B- are two entities
        ("PART", "kit"),
        ("FAILURE", "leak"),  # I- after O opens one
        ("COMPONENT", "fuse"),  # I- of another label opens one
    ]


def test_decode_bilou_closes_after_last_and_unit(tokenizer):
    scheme = TagScheme(LABELS, kind="BILOU")
    text = "pump seal kit oil leak fuse box"
    tags = ["U-ASSET", "I-ASSET", "L-PART", "I-PART", "B-FAILURE", "L-FAILURE", "I-FAILURE"]
    encoding, logits = one_word_logits(tokenizer, scheme, text, [(t, 9.0) for t in tags])
    assert [(s.label, s.text) for s in decode(text, encoding, logits, scheme)] == [
        ("ASSET", "pump"),
        ("ASSET", "seal"),  # I- after U- opens a new entity
        ("PART", "kit"),  # a lone L- is an entity of one word
        ("PART", "oil"),
        ("FAILURE", "leak fuse"),
        ("FAILURE", "box"),  # I- after L- opens a new entity
    ]


def test_decode_refuses_logits_that_do_not_fit(tokenizer):
    scheme = TagScheme(LABELS)
    text = "pump leaking"
    encoding = tokenizer.encode(text)
    good = np.zeros((len(encoding), len(scheme.tags)))
    with pytest.raises(ValueError, match="do not fit 4 tokens and 13 tags"):
        decode(text, encoding, good[:, :5], scheme)
    with pytest.raises(ValueError, match="NaN"):
        decode(text, encoding, np.where(good == 0, np.nan, good), scheme)
    with pytest.raises(ValueError, match="aggregation strategy must be one of"):
        decode(text, encoding, good, scheme, "none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not this text's encoding"):
        decode("pump", encoding, good, scheme)


LONG_TEXT = " ".join(text for text, _ in WORK_ORDERS[:4])


def long_case():
    spans = []
    at = 0
    for text, entities in WORK_ORDERS[:4]:
        spans += [(start + at, end + at, label) for start, end, label in annotate(text, *entities)]
        at += len(text) + 1
    return LONG_TEXT, spans


def test_windows_cover_the_text_and_refuse_a_stride_too_wide(tokenizer):
    text, _ = long_case()
    full = tokenizer.encode(text)
    cut = windows(window_tokenizer(tokenizer, 24, 6), text)
    assert len(full) > 3 * 24 and len(cut) >= 5
    assert all(len(w) <= 24 for w in cut)
    assert cut[0].offsets[1] == full.offsets[1] and cut[-1].offsets[-2] == full.offsets[-2]
    assert windows(tokenizer, text)[0].ids == full.ids  # no truncation: one window
    with pytest.raises(ValueError, match="stride 22 must be less than the 22 text tokens"):
        windows(window_tokenizer(tokenizer, 24, 22), text)


def _text_logits(tokenizer: Tokenizer, text: str, spans, scheme: TagScheme):
    """Logits for any window of ``text`` that depend on the token only, never on the window."""
    full = tokenizer.encode(text)
    rows = gold_logits(full, spans, scheme, pieces="noise")
    rows += np.random.default_rng(3).normal(0, 1.5, rows.shape)
    by_offsets = dict(zip(full.offsets, rows, strict=True))

    def logits(encoding) -> np.ndarray:
        return np.stack([by_offsets[o] for o in encoding.offsets])

    return full, logits


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_windows_equals_one_window_over_the_whole_text(tokenizer, strategy):
    scheme = TagScheme(LABELS)
    text, spans = long_case()
    full, logits = _text_logits(tokenizer, text, spans, scheme)
    whole = decode(text, full, logits(full), scheme, strategy)
    assert len(full) > 3 * 20
    cut = windows(window_tokenizer(tokenizer, 20, 8), text)
    # Window edges fall inside words ("##...") so the merge has words and entities to rejoin.
    assert any(w.tokens[1].startswith("##") for w in cut[1:])
    merged = merge_windows(text, [(w, logits(w)) for w in cut], scheme, strategy)
    assert merged == whole
    assert len(whole) >= 10


@pytest.mark.parametrize(("max_length", "stride"), [(20, 8), (16, 4), (16, 9), (30, 0), (12, 1)])
def test_merge_windows_takes_each_token_from_its_most_central_window(tokenizer, max_length, stride):
    scheme = TagScheme(LABELS)
    text, spans = long_case()
    cut = windows(window_tokenizer(tokenizer, max_length, stride), text)
    room = max_length - 2
    # Where each window starts in the text's tokens, from the stride: window k at k * (room - stride).
    starts = [k * (room - stride) for k in range(len(cut))]
    sizes = [len(w) - 2 for w in cut]
    owner = {}
    for k, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        for j in range(size):
            context = min(j, size - 1 - j)
            if start + j not in owner or context > owner[start + j][0]:
                owner[start + j] = (context, k)
    encoded = []
    wrong = scheme.tag_to_id["B-FAILURE"]
    for k, window in enumerate(cut):
        logits = gold_logits(window, spans, scheme)
        for j in range(sizes[k]):
            if owner[starts[k] + j][1] != k:
                logits[j + 1] = 0.0
                logits[j + 1, wrong] = 20.0  # what a window edge would get wrong
        encoded.append((window, logits))
    merged = merge_windows(text, encoded, scheme)
    assert [(s.start, s.end, s.label) for s in merged] == spans
    assert [s.text for s in merged] == [text[a:b] for a, b, _ in spans]


def test_merge_windows_refuses_windows_out_of_order(tokenizer):
    scheme = TagScheme(LABELS)
    text, spans = long_case()
    cut = windows(window_tokenizer(tokenizer, 24, 0), text)
    encoded = [(w, gold_logits(w, spans, scheme)) for w in cut]
    with pytest.raises(ValueError, match="window 1 does not continue"):
        merge_windows(text, [encoded[1], encoded[0]], scheme)


def test_span_f1_counts_exact_matches():
    gold = [[(0, 4, "ASSET"), (5, 9, "PART")], [(0, 3, "ACTION")]]
    pred = [[(0, 4, "ASSET"), (5, 8, "PART")], [(0, 3, "PART")]]
    scores = span_f1(gold, pred)
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["support"] == 3
    assert scores["per_label"]["ASSET"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_label"]["ACTION"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["per_label"]["PART"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert span_f1([[]], [[]])["f1"] == 0.0
    with pytest.raises(ValueError, match="2 gold texts but 1 predicted"):
        span_f1(gold, pred[:1])


def _random_spans(rng: random.Random, n_words: int) -> list[tuple[int, int, str]]:
    """Non-overlapping word spans as (first word, last word + 1, label)."""
    spans, at = [], 0
    while at < n_words:
        at += rng.randint(0, 3)
        length = rng.randint(1, 3)
        if at + length > n_words:
            break
        spans.append((at, at + length, rng.choice(LABELS)))
        at += length
    return spans


def _perturbed(rng: random.Random, spans, n_words: int):
    out = []
    for start, end, label in spans:
        roll = rng.random()
        if roll < 0.15:
            continue
        if roll < 0.3:
            label = rng.choice(LABELS)
        elif roll < 0.45 and end - start > 1:
            end -= 1
        out.append((start, end, label))
    # Spurious entities in the gaps.
    taken = {w for s, e, _ in out for w in range(s, e)}
    for w in range(n_words):
        if w not in taken and rng.random() < 0.1:
            out.append((w, w + 1, rng.choice(LABELS)))
            taken.add(w)
    return sorted(out)


def _bio(word_spans, n_words: int) -> list[str]:
    tags = ["O"] * n_words
    for start, end, label in word_spans:
        tags[start] = f"B-{label}"
        for w in range(start + 1, end):
            tags[w] = f"I-{label}"
    return tags


def test_span_f1_matches_seqeval_on_word_level_bio():
    rng = random.Random(7)
    vocabulary = ["pump", "P-101", "unscrewed", "3bar", "seal", "kit", "leaking", "on", "line", "oil"]
    gold_chars, pred_chars, gold_tags, pred_tags = [], [], [], []
    for _ in range(60):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(1, 14))]
        bounds, at = [], 0
        for word in words:
            bounds.append((at, at + len(word)))
            at += len(word) + 1
        gold = _random_spans(rng, len(words))
        pred = _perturbed(rng, gold, len(words))

        def chars(word_spans, bounds=bounds):
            return [(bounds[s][0], bounds[e - 1][1], label) for s, e, label in word_spans]

        gold_chars.append(chars(gold))
        pred_chars.append(chars(pred))
        gold_tags.append(_bio(gold, len(words)))
        pred_tags.append(_bio(pred, len(words)))
    ours = span_f1(gold_chars, pred_chars)
    assert 0.3 < ours["f1"] < 0.95  # neither trivial nor perfect
    assert ours["precision"] == pytest.approx(precision_score(gold_tags, pred_tags, zero_division=0))
    assert ours["recall"] == pytest.approx(recall_score(gold_tags, pred_tags, zero_division=0))
    assert ours["f1"] == pytest.approx(f1_score(gold_tags, pred_tags, zero_division=0))
    report = classification_report(gold_tags, pred_tags, output_dict=True, zero_division=0)
    assert set(ours["per_label"]) == set(LABELS) == {k for k in report if not k.endswith("avg")}
    for label, scores in ours["per_label"].items():
        for key in ("precision", "recall", "f1"):
            assert scores[key] == pytest.approx(report[label][f"{key}-score" if key == "f1" else key])
        assert scores["support"] == report[label]["support"]
