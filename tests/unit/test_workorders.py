"""Properties of the synthetic work orders that entity training and the CRF baseline rely on."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tools import workorders
from tools.replay import load_span_jsonl
from tools.workorders import (
    ENTITY_LABELS,
    ENTITY_LABELS_PATH,
    WorkOrder,
    WorkOrderStream,
    default_site_vocabularies,
    site_vocabulary,
    to_payload,
    workorder_dataset,
)


@pytest.fixture(scope="module")
def drifting() -> list[WorkOrder]:
    return workorder_dataset(2000, seed=11, drift=True)


def entity_words(records: list[WorkOrder], label: str | None = None) -> Counter[str]:
    """Lower-case words of letters inside entities (numbers and tag digits vary by design)."""
    return Counter(
        w.lower()
        for r in records
        for s, e, lab in r.entities
        if label in (None, lab)
        for w in re.findall(r"[A-Za-z]+", r.text[s:e])
    )


def test_labels_file_lists_the_six_entity_labels() -> None:
    assert json.loads(ENTITY_LABELS_PATH.read_text())["labels"] == list(ENTITY_LABELS)
    assert ENTITY_LABELS == ("ASSET", "COMPONENT", "FAILURE", "ACTION", "PART", "QUANTITY")


def test_same_seed_gives_same_work_orders_and_other_seeds_do_not() -> None:
    assert workorder_dataset(400, seed=3, drift=True) == workorder_dataset(400, seed=3, drift=True)
    assert [w.text for w in workorder_dataset(200, seed=1)] != [
        w.text for w in workorder_dataset(200, seed=2)
    ]


def test_take_and_iteration_continue_the_stream() -> None:
    whole = WorkOrderStream(seed=4, sites=2, drift_at=150).take(300)
    chunked = WorkOrderStream(seed=4, sites=2, drift_at=150)
    assert chunked.take(77) + chunked.take(223) == whole
    iterated = iter(WorkOrderStream(seed=4, sites=2, drift_at=150))
    assert [next(iterated) for _ in range(300)] == whole
    assert [w.ts for w in whole] == sorted(w.ts for w in whole) and len({w.ts for w in whole}) == 300


def test_drift_point_leaves_the_records_before_it_unchanged() -> None:
    plain = WorkOrderStream(seed=5, drift_at=None).take(400)
    drifting = WorkOrderStream(seed=5, drift_at=250).take(400)
    assert drifting[:250] == plain[:250]
    assert [w.drifted for w in drifting] == [False] * 250 + [True] * 150
    assert not any(w.drifted for w in plain)
    assert [w.text for w in drifting[250:]] != [w.text for w in plain[250:]]


def test_offsets_are_exact_sorted_and_never_overlap(drifting: list[WorkOrder]) -> None:
    for wo in drifting:
        assert wo.text == wo.text.strip() and "  " not in wo.text
        assert wo.entities, wo.text
        for start, end, label in wo.entities:
            entity = wo.text[start:end]
            assert 0 <= start < end <= len(wo.text)
            assert entity == entity.strip(), (wo.text, entity)
            assert label in ENTITY_LABELS
        for (_, end1, _), (start2, _, _) in zip(wo.entities, wo.entities[1:], strict=False):
            assert end1 < start2, wo  # at least one character between two entities


def test_each_label_appears_before_and_after_drift(drifting: list[WorkOrder]) -> None:
    for part in ([w for w in drifting if not w.drifted], [w for w in drifting if w.drifted]):
        counts = Counter(label for w in part for _, _, label in w.entities)
        assert set(counts) == set(ENTITY_LABELS)
        assert min(counts.values()) >= 0.05 * len(part), counts


def test_noise_shows_abbreviations_typos_case_and_terse_notes(drifting: list[WorkOrder]) -> None:
    texts = [w.text for w in drifting]
    words = Counter(w.lower() for t in texts for w in re.findall(r"\S+", t))
    for shorthand in ("brg", "w/", "chk'd", "repl.", "approx"):
        assert words[shorthand] > 0, shorthand
    assert sum(t.isupper() for t in texts) > 20  # shouted notes
    assert sum(len(w.entities) == 2 for w in drifting) > 20  # terse "P-101 leaking"
    # Misspelt entity words: a few percent of the words are seen only once.
    once = [w for w, n in entity_words(drifting).items() if n == 1]
    assert len(once) > 50


def test_asset_is_the_tag_with_its_family_word_when_written() -> None:
    records = workorder_dataset(600, seed=2)
    assets = [w.text[s:e] for w in records for s, e, label in w.entities if label == "ASSET"]
    tag = re.compile(r"(#?[A-Za-z]*-?\d+[A-Za-z]?)$")
    assert all(tag.search(a) for a in assets), [a for a in assets if not tag.search(a)][:5]
    with_noun = [a for a in assets if " " in a]
    assert 0.3 * len(assets) < len(with_noun) < 0.9 * len(assets)


def test_sites_use_their_own_asset_families_and_tag_formats() -> None:
    records = workorder_dataset(1500, seed=0, sites=3)
    tags = {
        site: Counter(
            re.sub(r"\d", "9", w.text[s:e].split()[-1].upper())
            for w in records
            if w.site == site
            for s, e, label in w.entities
            if label == "ASSET"
        )
        for site in ("site0", "site1", "site2")
    }
    for a, b in (("site0", "site1"), ("site0", "site2"), ("site1", "site2")):
        shared = set(tags[a]) & set(tags[b])
        assert sum(tags[a][t] for t in shared) < 0.1 * sum(tags[a].values()), (a, b, shared)
    vocabs = default_site_vocabularies(3)
    assert vocabs[0].banks["template"] != vocabs[1].banks["template"]
    assert [v.name for v in vocabs] == ["site0", "site1", "site2"]


def test_drift_brings_new_assets_failures_and_shorthand(drifting: list[WorkOrder]) -> None:
    pre = [w for w in drifting if not w.drifted]
    post = [w for w in drifting if w.drifted]
    for label in ("ASSET", "COMPONENT", "FAILURE", "ACTION"):
        before, after = entity_words(pre, label), entity_words(post, label)
        new = sum(n for w, n in after.items() if w not in before)
        assert new > 0.25 * sum(after.values()), (label, new, sum(after.values()))
    post_text = " ".join(w.text for w in post).lower()
    pre_text = " ".join(w.text for w in pre).lower()
    for marker in ("r&r'd", "psi", " | "):
        assert marker in post_text and marker not in pre_text, marker


def test_drifted_vocabulary_extends_the_same_site() -> None:
    before = site_vocabulary("site1", 1, seed=7)
    after = site_vocabulary("site1", 1, seed=7, drifted=True)
    assert after.banks == before.banks and after.variant == before.variant
    assert not any(before.novel.values()) and before.novel_share == 0.0
    assert all(after.novel.values()) and after.novel_share > 0.3
    assert after.abbreviation_rate == before.abbreviation_rate


def test_stream_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="drift_at"):
        WorkOrderStream(drift_at=-1)
    with pytest.raises(ValueError, match="pre-drift"):
        WorkOrderStream(sites=[site_vocabulary("a", 0, drifted=True)])
    with pytest.raises(ValueError):
        WorkOrderStream(sites=[])


def test_payload_carries_id_text_and_spans() -> None:
    wo = workorder_dataset(1, seed=9)[0]
    payload = to_payload(wo)
    assert set(payload) == {"id", "text", "entities"}
    assert uuid.UUID(payload["id"]).version == 4
    assert payload["entities"] == [{"start": s, "end": e, "label": label} for s, e, label in wo.entities]
    assert to_payload(wo, id="wo-1")["id"] == "wo-1"
    assert json.loads(json.dumps(payload, ensure_ascii=False)) == payload


def test_jsonl_dump_is_reproducible_and_reads_back(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    argv = ["--n", "120", "--seed", "3", "--drift-at", "60"]
    assert workorders.main([*argv, "--jsonl", str(first)]) == 0
    assert workorders.main([*argv, "--jsonl", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    expected = WorkOrderStream(seed=3, drift_at=60).take(120)
    assert load_span_jsonl(first) == [(w.text, list(w.entities)) for w in expected]
    rows = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert [r["drifted"] for r in rows] == [w.drifted for w in expected]
    assert len({r["id"] for r in rows}) == 120
