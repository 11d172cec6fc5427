"""The entity readers of tools.replay: CoNLL (BIO, BIOES, BILOU) and span JSONL, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.replay import ConllFormatError, SpanFormatError, load_conll, load_span_jsonl
from tools.workorders import workorder_dataset


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def entities(example: tuple[str, list[tuple[int, int, str]]]) -> list[tuple[str, str]]:
    text, spans = example
    return [(text[s:e], label) for s, e, label in spans]


# ---- CoNLL ----------------------------------------------------------------------------------


def test_conll_bio_with_docstart_extra_columns_and_no_final_blank(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.conll",
        "-DOCSTART- -X- O O\n\n"
        "replaced VBD O O\nseal NN B-NP B-COMPONENT\non IN O O\npump NN B-NP B-ASSET\nP-101 NN I-NP I-ASSET\n"
        "\n\n"
        "P-7 NN O B-ASSET\nleaking VBG O B-FAILURE\nat IN O O\n3 CD O B-QUANTITY\nbar NN O I-QUANTITY",
    )
    first, second = load_conll(path)
    assert first[0] == "replaced seal on pump P-101"
    assert first[1] == [(9, 13, "COMPONENT"), (17, 27, "ASSET")]
    assert entities(second) == [("P-7", "ASSET"), ("leaking", "FAILURE"), ("3 bar", "QUANTITY")]


def test_conll_bioes_bilou_and_iob1(tmp_path: Path) -> None:
    bioes = write(tmp_path / "e.conll", "seal\tS-C\nbrg\tS-C\npump\tB-A\nP\tI-A\n1\tE-A\nok\tO\n")
    assert entities(load_conll(bioes)[0]) == [("seal", "C"), ("brg", "C"), ("pump P 1", "A")]
    bilou = write(tmp_path / "u.conll", "x\tU-A\ny\tB-A\nz\tL-A\nw\tu-A\n")
    assert entities(load_conll(bilou)[0]) == [("x", "A"), ("y z", "A"), ("w", "A")]
    # IOB1 starts an entity with I- and splits two adjacent ones with B-.
    iob1 = write(tmp_path / "i.conll", "a\tI-X\nb\tI-X\nc\tB-X\nd\tI-Y\ne\tE-Y\nf\tE-X\n")
    assert entities(load_conll(iob1)[0]) == [("a b", "X"), ("c", "X"), ("d e", "Y"), ("f", "X")]


def test_conll_tab_columns_keep_spaces_inside_a_token(tmp_path: Path) -> None:
    path = write(tmp_path / "t.conll", "SKF 6205-2RS\tB-PART\nfitted\tB-ACTION\n\n")
    assert load_conll(path) == [("SKF 6205-2RS fitted", [(0, 12, "PART"), (13, 19, "ACTION")])]
    assert load_conll(write(tmp_path / "empty.conll", "\n\n-DOCSTART- O\n")) == []


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        ("a O\nb X-FOO\n", 2, "X-FOO"),
        ("a O\n\nb B-\n", 3, "'B-'"),
        ("a B-A\nlonely\n", 2, "want a token and a tag"),
        ("a B-A\nb ASSET\n", 2, "'ASSET'"),
        ("a\tB-A\n\tO\n", 2, "want a token and a tag"),
    ],
)
def test_conll_errors_name_the_line(tmp_path: Path, body: str, line: int, what: str) -> None:
    with pytest.raises(ConllFormatError, match=f"line {line}: .*{what}"):
        load_conll(write(tmp_path / "bad.conll", body))


def bio_lines(tokens: list[str], tags: list[str]) -> str:
    return "".join(f"{t} {g}\n" for t, g in zip(tokens, tags, strict=True)) + "\n"


def test_conll_reads_back_simulated_work_orders(tmp_path: Path) -> None:
    from tools.bench.crf import spans_to_bio, tokenize

    records = workorder_dataset(300, seed=8, drift=True)
    body = "-DOCSTART- O\n\n"
    for wo in records:
        tokens = tokenize(wo.text)
        body += bio_lines([wo.text[s:e] for s, e in tokens], spans_to_bio(tokens, wo.entities))
    read = load_conll(write(tmp_path / "wo.conll", body))
    assert len(read) == len(records)
    for wo, example in zip(records, read, strict=True):
        # The text is re-spaced token by token, so compare what the entities say.
        said = [wo.text[a:b] for a, b, _ in wo.entities]
        expected = [" ".join(x[s:e] for s, e in tokenize(x)) for x in said]
        assert entities(example) == list(zip(expected, [lab for *_, lab in wo.entities], strict=True))


_token = st.text(alphabet="abcXYZ019-.'", min_size=1, max_size=6)


@st.composite
def tagged_sentence(draw: st.DrawFn) -> tuple[list[str], list[tuple[int, int, str]]]:
    """Tokens and non-overlapping token-index spans (first, last, label)."""
    tokens = draw(st.lists(_token, min_size=1, max_size=12))
    spans: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        if draw(st.booleans()):
            length = draw(st.integers(1, min(3, len(tokens) - i)))
            spans.append((i, i + length - 1, draw(st.sampled_from(["ASSET", "PART", "QUANTITY"]))))
            i += length
        else:
            i += 1
    return tokens, spans


def encode(tokens: list[str], spans: list[tuple[int, int, str]], scheme: str) -> list[str]:
    tags = ["O"] * len(tokens)
    single, last = {"BIO": ("B", "I"), "BIOES": ("S", "E"), "BILOU": ("U", "L")}[scheme]
    for first, end, label in spans:
        if first == end:
            tags[first] = f"{single}-{label}"
            continue
        tags[first] = f"B-{label}"
        for i in range(first + 1, end):
            tags[i] = f"I-{label}"
        tags[end] = f"{last}-{label}"
    return tags


@settings(max_examples=150, deadline=None)
@given(
    sentences=st.lists(tagged_sentence(), min_size=1, max_size=4),
    scheme=st.sampled_from(["BIO", "BIOES", "BILOU"]),
)
def test_conll_round_trip_property(tmp_path_factory: pytest.TempPathFactory, sentences, scheme: str) -> None:
    path = tmp_path_factory.mktemp("conll") / "p.conll"
    path.write_text("".join(bio_lines(t, encode(t, s, scheme)) for t, s in sentences), encoding="utf-8")
    read = load_conll(path)
    assert len(read) == len(sentences)
    for (tokens, spans), (text, got) in zip(sentences, read, strict=True):
        assert text == " ".join(tokens)
        assert [(text[s:e], label) for s, e, label in got] == [
            (" ".join(tokens[a : b + 1]), label) for a, b, label in spans
        ]


# ---- span JSONL -----------------------------------------------------------------------------


def jsonl(path: Path, *records: object) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return write(path, "\n".join(lines) + "\n")


def test_span_jsonl_reads_objects_triples_and_doccano_label_key(tmp_path: Path) -> None:
    text = "repl. seal on P-101"
    path = jsonl(
        tmp_path / "a.jsonl",
        {
            "id": "1",
            "text": text,
            "entities": [
                {"start": 14, "end": 19, "label": "ASSET"},
                {"start": 0, "end": 5, "label": "ACTION"},
            ],
        },
        "",
        {"text": text, "entities": [[6, 10, "COMPONENT"]], "site": "site0"},
        {"text": text, "label": [[14, 19, "ASSET"]]},
        {"text": "no entities here"},
    )
    assert load_span_jsonl(path) == [
        (text, [(0, 5, "ACTION"), (14, 19, "ASSET")]),
        (text, [(6, 10, "COMPONENT")]),
        (text, [(14, 19, "ASSET")]),
        ("no entities here", []),
    ]


def test_span_jsonl_trims_whitespace_taken_into_a_span(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "w.jsonl", {"text": "seal leaking now", "entities": [[4, 13, "FAILURE"]]})
    assert load_span_jsonl(path) == [("seal leaking now", [(5, 12, "FAILURE")])]


@pytest.mark.parametrize(
    ("record", "what"),
    [
        ('{"text": "abc", "entities": [}', "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"entities": []}, "'text'"),
        ({"text": "  ", "entities": []}, "'text'"),
        ({"text": "abc", "entities": {"start": 0}}, "must be a list"),
        ({"text": "abc", "entities": [[0, 4, "A"]]}, "0 <= start < end <= 3"),
        ({"text": "abc", "entities": [[2, 2, "A"]]}, "0 <= start < end"),
        ({"text": "abc", "entities": [[0, 1]]}, "neither"),
        ({"text": "abc", "entities": [{"start": 0, "end": 1}]}, "no label"),
        ({"text": "abc", "entities": [[0, 1.5, "A"]]}, "integers"),
        ({"text": "abc", "entities": [[False, 1, "A"]]}, "integers"),
        ({"text": "abc", "entities": [[0, 1, ""]]}, "label"),
        ({"text": "a  b", "entities": [[1, 3, "A"]]}, "only whitespace"),
        ({"text": "pump P-101", "entities": [[0, 10, "ASSET"], [5, 10, "ASSET"]]}, "overlap"),
    ],
)
def test_span_jsonl_errors_name_the_line(tmp_path: Path, record: object, what: str) -> None:
    path = jsonl(tmp_path / "bad.jsonl", {"text": "fine", "entities": []}, "", record)
    with pytest.raises(SpanFormatError, match=f"line 3: .*{what}"):
        load_span_jsonl(path)
