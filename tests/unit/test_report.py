"""tools.report: figures and plots from databases written by the real Store (and the learner's
registry schema), through ``edge-agent report``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.learner.manager import REGISTRY_SCHEMA
from agent.store import NewFeedback, NewPrediction, NewSample, Store
from tools import report

T0 = 1_800_000_000.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_box(directory: Path, correct: list[bool], latency_ms: list[float]) -> Path:
    """A box database: one prediction per second (with latency), feedback on each, a sample each,
    two promotions (local, fleet), one refused candidate and one acknowledged upload."""
    db = directory / "edge-agent.db"
    store = Store(db).open()
    rows: list = []
    for i in range(len(correct)):
        rows.append(
            NewPrediction(
                id=f"p{i}",
                text="t",
                text_sha256="h",
                label="a",
                score=0.9,
                top_k=[("a", 0.9)],
                adapter_version=None,
                latency_ms=latency_ms[i],
            )
        )
    store.write(rows, 0.2)
    for i in range(len(correct)):
        # created_at is the commit time: spread them one second apart.
        store.db.conn.execute("UPDATE predictions SET created_at = ? WHERE id = ?", (T0 + i, f"p{i}"))
    store.db.conn.commit()
    store.write(
        [
            NewFeedback(key=f"f{i}", prediction_id=f"p{i}", label="a" if ok else "b")
            for i, ok in enumerate(correct)
        ]
        + [
            NewSample(key=f"id:s{i}", text=f"text {i}", label="a", sample_id=f"s{i}")
            for i in range(len(correct))
        ],
        0.2,
    )
    store.outbox_put("upload", "u1", "fed/f/up/box", {"adapter_version": "v1", "round": 1}, b"x" * 10, 10**6)
    store.outbox_ack("u1", {"upload_id": "u1", "status": "accepted", "round": 1})
    store.close()
    with sqlite3.connect(db) as c:
        c.executescript(REGISTRY_SCHEMA)
        c.executemany(
            "INSERT INTO adapter_versions (version, path, status, metrics, created_at, promoted_at, origin,"
            " data_to_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                # v1 read its data when sample row 3 had arrived; v2's newest sample is gone.
                ("v1", "p", "retired", json.dumps({"seconds": 5.0}), T0 + 10, T0 + 10, "local", 3),
                # Fast-learner refreshes of v1 (same LoRA): one promoted, one refused.
                ("v1-f1", "p", "retired", json.dumps({"lora_of": "v1"}), T0 + 15, T0 + 15, "local", 3),
                ("v1-f2", "p", "rejected", json.dumps({"lora_of": "v1"}), T0 + 17, None, "local", 3),
                ("fleet-f-r1", "p", "promoted", None, T0 + 20, T0 + 20, "fleet", 3),
                ("v2", "p", "rejected", json.dumps({"seconds": 4.0}), T0 + 30, None, "local", 999),
            ],
        )
        c.execute("INSERT INTO learner_state (key, value) VALUES ('active', 'fleet-f-r1')")
        c.execute("UPDATE samples SET received_at = ? WHERE id = 3", (T0 + 2,))
    return db


def make_hq(directory: Path) -> Path:
    from agent.fed.hq_store import HqStore

    hq = HqStore(directory / "aggregator.db")
    conn = hq._conn()
    conn.execute(
        "INSERT INTO rounds (id, strategy, base_hash, min_uploads, opened_at, deadline, status, closed_at, result)"
        " VALUES (1, 'ffa_lora', 'h', 3, ?, ?, 'closed', ?, ?)",
        (T0 + 1, T0 + 100, T0 + 18, json.dumps({"participants": 3})),
    )
    conn.execute(
        "INSERT INTO rounds (id, strategy, base_hash, min_uploads, opened_at, deadline, status)"
        " VALUES (2, 'ffa_lora', 'h', 3, ?, ?, 'open')",
        (T0 + 19, T0 + 200),
    )
    return directory / "aggregator.db"


@pytest.fixture
def fleet_files(tmp_path):
    a = tmp_path / "site0"
    b = tmp_path / "site1" / "data"
    a.mkdir()
    b.mkdir(parents=True)
    db_a = make_box(a, [False] * 10 + [True] * 30, [float(i + 1) for i in range(40)])
    db_b = make_box(b, [True, False] * 20, [10.0] * 40)
    hq = tmp_path / "hq"
    hq.mkdir()
    return db_a, db_b, make_hq(hq)


def test_figures_from_the_databases(fleet_files):
    db_a, db_b, hq = fleet_files
    fleet = report.read_fleet([db_a, db_b, hq], marks=[("drift", T0 + 25)])
    assert [b.name for b in fleet.boxes] == ["site0", "site1"]  # the generic "data" directory skipped
    assert [(r.id, r.participants, r.closed_at is not None) for r in fleet.rounds] == [
        (1, 3, True),
        (2, None, False),
    ]
    a = fleet.boxes[0]
    assert len(a.judged) == 40 and a.judged[0] == (T0, False) and a.judged[-1] == (T0 + 39, True)
    assert sorted(a.sample_ids) == sorted(f"s{i}" for i in range(40))
    assert [(p.version, p.origin) for p in a.promotions] == [("v1", "local"), ("fleet-f-r1", "fleet")]
    started = {p.version: p.started_at for p in a.adapters}
    # v2: decision - training seconds; refreshes train nothing
    assert started == {"v1": T0 + 2, "v1-f1": None, "v1-f2": None, "fleet-f-r1": None, "v2": T0 + 26}
    assert [p.version for p in a.refreshes] == ["v1-f1"]
    assert a.uploads[0].round == 1 and a.uploads[0].acked_at is not None and a.uploads[0].status == "accepted"

    summary = report.fleet_summary(fleet)
    assert summary["sites"] == ["site0", "site1"] and summary["rounds_completed"] == 1
    s0 = summary["per_site"]["site0"]
    assert s0["prequential_accuracy"] == 0.75 and s0["judged_predictions"] == 40
    assert (s0["promoted_local"], s0["promoted_fleet"], s0["rejected"]) == (1, 1, 1)
    assert (s0["fast_learner_refreshes_promoted"], s0["fast_learner_refreshes_refused"]) == (1, 1)
    assert s0["active_adapter"] == "fleet-f-r1" and s0["uploads_acknowledged"] == 1
    assert s0["latency_p50_ms"] == 20.5 and s0["latency_p99_ms"] == pytest.approx(39.61)
    assert summary["per_site"]["site1"]["prequential_accuracy"] == 0.5

    series = report.rolling_accuracy(a.judged, 10)
    assert series[0] == (T0 + 9, 0.0) and series[10] == (T0 + 19, 1.0) and len(series) == 31
    assert report.window_accuracy(a.judged, T0, T0 + 20) == 0.5
    assert report.window_accuracy(a.judged, T0 + 100, T0 + 200) is None
    # Windows cut to the adapter serving: v1 was promoted at +10, the fleet global at +20.
    promoted = [p.at for p in a.promotions]
    w = report.serving_window
    assert w(a.judged, promoted, T0, T0 + 15, "end", min_count=5) == 1.0  # +10..+15 only
    assert w(a.judged, promoted, T0, T0 + 15, "end", min_count=6) == 1 / 3  # too few: all of +0..+15
    assert w(a.judged, promoted, T0 + 5, T0 + 40, "start", min_count=5) == 0.0  # +5..+10
    assert w(a.judged, promoted, T0 + 12, T0 + 40, "start", min_count=5) == 1.0  # +12..+20
    assert report.latency_bins(a.latencies, 10.0, min_count=11) == []
    bins = report.latency_bins(a.latencies, 10.0)
    assert [(c - T0, n) for c, _, _, n in bins] == [(5.0, 10), (15.0, 10), (25.0, 10), (35.0, 10)]
    assert bins[0][1] == pytest.approx(5.5) and bins[0][2] == pytest.approx(9.91)


def test_edge_agent_report_writes_the_plots(fleet_files, tmp_path, capsys):
    db_a, db_b, hq = fleet_files
    out = tmp_path / "out"
    code = cli_main(
        [
            "report",
            str(db_a),
            f"other={db_b}",
            str(hq),
            "--mark",
            "drift=2027-01-15T08:00:25",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in (report.ACCURACY_PNG, report.LATENCY_PNG, report.ROUNDS_PNG):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000, name
    written = json.loads((out / "report.json").read_text())
    assert written["sites"] == ["site0", "other"] and written["rounds_completed"] == 1
    assert written["per_site"]["other"]["prequential_accuracy"] == 0.5
    printed = capsys.readouterr().out
    assert "site0: 40 predictions, prequential accuracy 0.75" in printed and "1 rounds completed" in printed


def test_marks_and_refusals():
    assert report.parse_mark("drift=1800000025.5") == ("drift", 1800000025.5)
    assert report.parse_mark("drift=2027-01-15T08:00:25+00:00")[1] == pytest.approx(1800000025.0)
    with pytest.raises(ValueError, match="LABEL=TIME"):
        report.parse_mark("drift")
    with pytest.raises(ValueError, match="neither"):
        report.parse_mark("drift=yesterday")


def test_an_aggregator_database_alone_is_refused(fleet_files):
    with pytest.raises(ValueError, match="no box database"):
        report.read_fleet([fleet_files[2]])
    with pytest.raises(FileNotFoundError):
        report.read_fleet([Path("/nonexistent/edge-agent.db")])
