"""Properties of the synthetic plant streams and the CSV replay that benchmarks rely on."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tools.replay import CsvFormatError, load_csv
from tools.simulate import (
    LABELS,
    LABELS_PATH,
    LabeledText,
    PlantStream,
    default_sites,
    labeled_dataset,
    stream_texts,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


def vocabulary(records: list[LabeledText]) -> set[str]:
    """Lower-case words of letters (and underscores, for sensor keys): numbers and ids vary by design."""
    return {
        w.lower() for r in records for w in re.findall(r"\w+", r.text) if re.fullmatch(r"[a-z_]+", w, re.I)
    }


def repeat_share(texts: list[str]) -> float:
    seen: set[str] = set()
    repeats = 0
    for text in texts:
        repeats += text in seen
        seen.add(text)
    return repeats / len(texts)


def test_same_seed_gives_same_records_and_other_seeds_do_not() -> None:
    assert labeled_dataset(600, seed=7, drift=True) == labeled_dataset(600, seed=7, drift=True)
    assert stream_texts(300, seed=1) != stream_texts(300, seed=2)


def test_take_continues_the_stream() -> None:
    site = default_sites(1)[0]
    whole = PlantStream(site, seed=3, drift_at=250).take(500)
    chunked = PlantStream(site, seed=3, drift_at=250)
    assert chunked.take(123) + chunked.take(377) == whole


def test_labels_are_the_default_label_set() -> None:
    expected = json.loads(LABELS_PATH.read_text())["labels"]
    assert list(LABELS) == expected
    for site in default_sites(4):
        assert list(site.label_weights) == expected
        assert sum(site.label_weights.values()) == pytest.approx(1.0)
    assert set(Counter(r.label for r in labeled_dataset(3000)).keys()) == set(expected)


@pytest.mark.parametrize("rate", [0.0, 0.18, 0.4])
def test_repeat_rate_follows_the_setting(rate: float) -> None:
    records = PlantStream(default_sites(2)[1], seed=5, repeat_rate=rate).take(3000)
    assert repeat_share([r.text for r in records]) == pytest.approx(rate, abs=0.03)


def test_texts_are_mostly_short_with_a_long_tail() -> None:
    lengths = np.array([len(words(t)) for t in stream_texts(4000, seed=2)])
    assert np.median(lengths) < 15
    assert lengths.max() < 45
    assert np.percentile(lengths, 99) > 2 * np.median(lengths)  # a tail exists, not one fixed length


def test_timestamps_are_monotone_and_drift_starts_at_drift_at() -> None:
    records = PlantStream(default_sites(1)[0], seed=1, drift_at=100).take(300)
    ts = [r.ts for r in records]
    assert all(later >= earlier for earlier, later in zip(ts, ts[1:], strict=False))
    assert [r.drifted for r in records] == [i >= 100 for i in range(300)]
    assert not any(r.drifted for r in PlantStream(default_sites(1)[0]).take(300))


def test_sites_differ_in_label_mix_and_vocabulary() -> None:
    sites = default_sites(3, seed=0)
    streams = {s.name: PlantStream(s, seed=0).take(2000) for s in sites}
    mixes = {
        name: np.array([sum(r.label == label for r in records) for label in LABELS]) / len(records)
        for name, records in streams.items()
    }
    names = list(mixes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            total_variation = 0.5 * np.abs(mixes[a] - mixes[b]).sum()
            assert total_variation > 0.1, (a, b, total_variation)
    vocabularies = {name: vocabulary(records) for name, records in streams.items()}
    for name, vocab in vocabularies.items():
        others = set().union(*(v for n, v in vocabularies.items() if n != name))
        assert len(vocab - others) >= 10, name  # equipment names and phrasing of its own


def test_drift_brings_vocabulary_never_seen_before() -> None:
    site = default_sites(1)[0]  # phrasing family 0 writes temp_c, renamed to tmp_motor by the drift
    records = PlantStream(site, seed=4, drift_at=1500).take(3000)
    before = [r for r in records if not r.drifted]
    after = [r for r in records if r.drifted]
    new_words = vocabulary(after) - vocabulary(before)
    assert len(new_words) >= 30, sorted(new_words)
    assert {"tmp_motor", "evt", "cavitation"} <= new_words
    assert any("temp_c=" in r.text for r in before)
    assert not any("temp_c=" in r.text for r in after)


def test_label_noise_flips_labels_at_the_given_rate_and_keeps_texts() -> None:
    site = default_sites(1)[0]
    clean = PlantStream(site, seed=9).take(4000)
    noisy = PlantStream(site, seed=9, label_noise=0.2).take(4000)
    assert [r.text for r in clean] == [r.text for r in noisy]
    flipped = [(c.label, n.label) for c, n in zip(clean, noisy, strict=True) if c.label != n.label]
    assert len(flipped) / len(clean) == pytest.approx(0.2, abs=0.025)
    assert all(new in LABELS for _, new in flipped)


def test_bad_stream_settings_are_rejected() -> None:
    site = default_sites(1)[0]
    with pytest.raises(ValueError, match="label_noise"):
        PlantStream(site, label_noise=1.5)
    with pytest.raises(ValueError, match="repeat_rate"):
        PlantStream(site, repeat_rate=1.0)


def test_tfidf_baseline_learns_but_not_perfectly_and_drops_after_drift() -> None:
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    records = labeled_dataset(6000, seed=0, drift=True)
    before = [r for r in records if not r.drifted]
    after = [r for r in records if r.drifted]
    model = make_pipeline(TfidfVectorizer(sublinear_tf=True), LogisticRegression(C=10, max_iter=1000))
    model.fit([r.text for r in before[:2000]], [r.label for r in before[:2000]])

    def accuracy(rs: list[LabeledText]) -> float:
        return float(np.mean(model.predict([r.text for r in rs]) == np.array([r.label for r in rs])))

    held_out, drifted = accuracy(before[2000:]), accuracy(after)
    assert 0.75 < held_out < 0.97
    assert held_out - drifted > 0.1


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_load_csv_round_trip(tmp_path: Path) -> None:
    records = labeled_dataset(60, seed=3)
    rows = [[f"{1000 + r.ts:.3f}", r.site, r.text, r.label] for r in records]
    rows[0][2] = 'filler 3: "noisy" bearing, replaced'  # quotes and delimiters inside a text
    path = write_csv(tmp_path / "records.csv", ["t", "plant", "description", "category"], rows)

    loaded = load_csv(path, "description", "category", time_col="t", site_col="plant")

    assert [r.text for r in loaded] == [row[2] for row in rows]
    assert [(r.label, r.site, r.drifted) for r in loaded] == [(r.label, r.site, False) for r in records]
    assert [r.ts for r in loaded] == pytest.approx([r.ts - records[0].ts for r in records], abs=1e-3)
    plain = load_csv(path, "description", "category")
    assert {r.site for r in plain} == {"site0"} and {r.ts for r in plain} == {0.0}


def test_load_csv_names_the_missing_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["description", "label"], [["ok", "normal"]])
    with pytest.raises(CsvFormatError, match=r"'category' \(--label-col\).*columns are: description, label"):
        load_csv(path, "description", "category")


def test_load_csv_names_the_bad_row(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "x.csv",
        ["t", "text", "label"],
        [["2026-01-01T00:00:00", "ok", "normal"], ["yesterday", "leak", "hydraulic"]],
    )
    with pytest.raises(CsvFormatError, match=r"line 3: cannot read time 'yesterday'"):
        load_csv(path, "text", "label", time_col="t")
    short = write_csv(tmp_path / "y.csv", ["text", "label"], [["ok", "normal"], ["leak"]])
    with pytest.raises(CsvFormatError, match=r"line 3: 1 fields, header has 2"):
        load_csv(short, "text", "label")
    empty_label = write_csv(tmp_path / "z.csv", ["text", "label"], [["leak", " "]])
    with pytest.raises(CsvFormatError, match=r"line 2: empty label in column 'label'"):
        load_csv(empty_label, "text", "label")


def run_tool(*args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_simulate_dry_run_prints_device_payloads() -> None:
    samples = run_tool(
        "tools.simulate",
        "--dry-run",
        "--site",
        "site1",
        "--device",
        "d1",
        "--count",
        "25",
        "--rate",
        "0",
        "--seed",
        "3",
    )
    expected = PlantStream(default_sites(2, seed=3)[1], seed=3).take(25)
    assert [s["text"] for s in samples] == [r.text for r in expected]
    for sample in samples:
        assert set(sample) == {"id", "text", "label", "ts"}
        assert uuid.UUID(str(sample["id"])).version == 4
        assert sample["label"] in LABELS and isinstance(sample["ts"], float)
    assert len({s["id"] for s in samples}) == len(samples)

    events = run_tool("tools.simulate", "--dry-run", "--unlabeled", "--count", "5", "--rate", "0")
    assert len(events) == 5 and all(set(e) == {"id", "text"} for e in events)


def test_replay_dry_run_publishes_each_row(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "r.csv",
        ["when", "text", "label"],
        [["2", "second", "normal"], ["1", "first, with comma", "mechanical"]],
    )
    samples = run_tool(
        "tools.replay",
        str(path),
        "--text-col",
        "text",
        "--label-col",
        "label",
        "--time-col",
        "when",
        "--speed",
        "0",
        "--dry-run",
    )
    assert [(s["text"], s["label"]) for s in samples] == [
        ("first, with comma", "mechanical"),
        ("second", "normal"),
    ]
