"""Plots and figures of a fleet from its SQLite databases: ``edge-agent report DB... --out DIR``.

Everything comes from what the boxes store (and, when given, the aggregator's database), so the
plots `make demo` writes can be drawn again from any box's ``data_dir/edge-agent.db``:

- accuracy: prequential, from ``predictions`` joined with ``feedback`` (each labeled record was
  first classified, then its label came back as feedback), a rolling window per site; promotions
  from the learner's registry ``adapter_versions`` (``promoted_at``, ``origin`` local/fleet);
- latency: ``predictions.latency_ms`` (message received -> prediction made), p50/p99 per time bin;
- rounds: the boxes' outbox (upload queued, acknowledged, for which round), the globals each box
  judged (``adapter_versions`` with origin 'fleet'), and the aggregator's ``rounds`` when its
  database is among the files.

``marks`` (``--mark drift=TIME``) draw events the databases cannot know, such as a plant change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCURACY_PNG = "accuracy.png"
LATENCY_PNG = "latency.png"
ROUNDS_PNG = "rounds.png"
DEFAULT_WINDOW = 50
MIN_BIN_COUNT = 10  # latency bins with fewer predictions are not drawn


@dataclass
class Promotion:
    version: str
    origin: str  # 'local' | 'fleet'
    at: float
    status: str  # 'promoted' | 'rejected' | ... (the registry's status now)
    decided_at: float = 0.0  # the gate's decision (registered)
    # Local rounds: when the round read its data (arrival of the newest sample it trained on).
    started_at: float | None = None
    # A fast-learner refresh (the registry's ``metrics.lora_of``): a new linear model on the same
    # LoRA weights, between rounds; drawn apart from rounds and not counted as one.
    refresh: bool = False


@dataclass
class Upload:
    key: str
    adapter_version: str | None
    queued_at: float
    acked_at: float | None
    round: int | None
    status: str | None  # the aggregator's answer: accepted / refused ...


@dataclass
class BoxData:
    """What one box's database says, as plain rows."""

    name: str
    path: Path
    # (created_at, correct) of every prediction that received feedback, in time order
    judged: list[tuple[float, bool]] = field(default_factory=list)
    # (created_at, latency_ms) of every prediction with a latency
    latencies: list[tuple[float, float]] = field(default_factory=list)
    predictions: int = 0
    samples: int = 0
    sample_ids: list[str] = field(default_factory=list)
    adapters: list[Promotion] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    active_version: str | None = None

    @property
    def promotions(self) -> list[Promotion]:
        """Promoted rounds and globals (refreshes: ``refreshes``)."""
        return [a for a in self.adapters if a.status not in ("rejected", "candidate") and not a.refresh]

    @property
    def refreshes(self) -> list[Promotion]:
        return [a for a in self.adapters if a.status not in ("rejected", "candidate") and a.refresh]


@dataclass
class HqRound:
    id: int
    opened_at: float
    closed_at: float | None
    participants: int | None
    strategy: str


@dataclass
class FleetData:
    boxes: list[BoxData]
    rounds: list[HqRound] = field(default_factory=list)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def t0(self) -> float:
        starts = [b.judged[0][0] for b in self.boxes if b.judged]
        starts += [b.latencies[0][0] for b in self.boxes if b.latencies]
        starts += [r.opened_at for r in self.rounds]
        return min(starts) if starts else 0.0


# ---- reading ----------------------------------------------------------------------------------


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def box_name(path: Path) -> str:
    """A box's name from its database path: the data directory's name (``site0/edge-agent.db``
    -> ``site0``), skipping a generic ``data`` directory."""
    parent = path.resolve().parent
    if parent.name in ("data", "state", "edge-agent") and parent.parent.name:
        return parent.parent.name
    return parent.name or path.stem


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such database")
    # Read-only: a report never changes a box's state (and works on a copy from a running box).
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def read_box(path: Path, name: str | None = None) -> BoxData:
    path = Path(path)
    conn = _connect(path)
    try:
        tables = _tables(conn)
        if "predictions" not in tables or "samples" not in tables:
            raise ValueError(f"{path}: not an edge-agent database (no predictions/samples tables)")
        box = BoxData(name=name or box_name(path), path=path)
        box.judged = [
            (float(t), bool(ok))
            for t, ok in conn.execute(
                "SELECT p.created_at, p.label = f.label FROM predictions p"
                " JOIN feedback f ON f.prediction_id = p.id GROUP BY p.id ORDER BY p.created_at"
            )
        ]
        columns = {r[1] for r in conn.execute("PRAGMA table_info(predictions)")}
        if "latency_ms" in columns:
            box.latencies = [
                (float(t), float(ms))
                for t, ms in conn.execute(
                    "SELECT created_at, latency_ms FROM predictions WHERE latency_ms IS NOT NULL"
                    " ORDER BY created_at"
                )
            ]
        box.predictions = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
        box.samples = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        box.sample_ids = [
            r[0] for r in conn.execute("SELECT sample_id FROM samples WHERE sample_id IS NOT NULL")
        ]
        if "adapter_versions" in tables:
            for version, origin, status, created, promoted, metrics, data_read in conn.execute(
                "SELECT a.version, a.origin, a.status, a.created_at, a.promoted_at, a.metrics, s.received_at"
                " FROM adapter_versions a LEFT JOIN samples s ON s.id = a.data_to_id"
                " ORDER BY a.created_at"
            ):
                started = None
                try:
                    refresh = bool(json.loads(metrics or "{}").get("lora_of"))
                except (ValueError, AttributeError):
                    refresh = False
                if (origin or "local") == "local" and not refresh:
                    started = float(data_read) if data_read is not None else None
                    if started is None:  # its newest sample is gone (retention): training time only
                        with contextlib.suppress(ValueError, TypeError):
                            started = float(created) - float(json.loads(metrics or "{}").get("seconds"))
                box.adapters.append(
                    Promotion(
                        version=version,
                        origin=origin or "local",
                        at=float(promoted if promoted is not None else created),
                        status=status,
                        decided_at=float(created),
                        started_at=started,
                        refresh=refresh,
                    )
                )
        if "learner_state" in tables:
            row = conn.execute("SELECT value FROM learner_state WHERE key = 'active'").fetchone()
            box.active_version = row[0] if row else None
        if "outbox" in tables and "kind" in {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}:
            for key, meta, created, acked, result in conn.execute(
                "SELECT key, meta, created_at, acked_at, result FROM outbox WHERE kind = 'upload' ORDER BY id"
            ):
                m = json.loads(meta) if meta else {}
                r = json.loads(result) if result else {}
                box.uploads.append(
                    Upload(
                        key=key,
                        adapter_version=m.get("adapter_version"),
                        queued_at=float(created),
                        acked_at=float(acked) if acked is not None else None,
                        round=r.get("round", m.get("round")),
                        status=r.get("status"),
                    )
                )
        return box
    finally:
        conn.close()


def read_hq(path: Path) -> list[HqRound]:
    conn = _connect(Path(path))
    try:
        rounds = []
        for rid, opened, closed, result, strategy in conn.execute(
            "SELECT id, opened_at, closed_at, result, strategy FROM rounds ORDER BY id"
        ):
            r = json.loads(result) if result else {}
            participants = r.get("participants")
            rounds.append(
                HqRound(
                    id=int(rid),
                    opened_at=float(opened),
                    closed_at=float(closed) if closed is not None else None,
                    participants=len(participants) if isinstance(participants, list) else participants,
                    strategy=strategy,
                )
            )
        return rounds
    finally:
        conn.close()


def is_aggregator_db(path: Path) -> bool:
    conn = _connect(Path(path))
    try:
        tables = _tables(conn)
    finally:
        conn.close()
    return "rounds" in tables and "uploads" in tables and "predictions" not in tables


def read_fleet(paths: Sequence[Path | str], marks: Sequence[tuple[str, float]] = ()) -> FleetData:
    """Boxes' and (any) aggregator databases; a path may be ``NAME=PATH`` to name a box."""
    boxes: list[BoxData] = []
    rounds: list[HqRound] = []
    for spec in paths:
        name, path = None, Path(spec)
        if isinstance(spec, str) and "=" in spec and not Path(spec).exists():
            name, raw = spec.split("=", 1)
            path = Path(raw)
        if is_aggregator_db(path):
            rounds.extend(read_hq(path))
        else:
            boxes.append(read_box(path, name))
    if not boxes:
        raise ValueError("no box database among the files (an aggregator's alone has no predictions)")
    return FleetData(boxes=boxes, rounds=sorted(rounds, key=lambda r: r.id), marks=list(marks))


def parse_mark(text: str) -> tuple[str, float]:
    """``LABEL=TIME``: TIME in epoch seconds or ISO 8601 (UTC when it has no zone)."""
    label, sep, when = text.partition("=")
    if not sep or not label:
        raise ValueError(f"mark {text!r}: expected LABEL=TIME")
    try:
        return label, float(when)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(when)
    except ValueError:
        raise ValueError(f"mark {text!r}: TIME is neither epoch seconds nor ISO 8601") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return label, t.timestamp()


# ---- figures ------------------------------------------------------------------------------------


def rolling_accuracy(judged: Sequence[tuple[float, bool]], window: int) -> list[tuple[float, float]]:
    """(time, accuracy of the last ``window`` judged predictions) from the first full window on
    (from the first prediction when there are fewer)."""
    out: list[tuple[float, float]] = []
    hits = 0
    w = max(1, min(window, len(judged)))
    for i, (t, ok) in enumerate(judged):
        hits += ok
        if i >= w:
            hits -= judged[i - w][1]
        if i >= w - 1:
            out.append((t, hits / w))
    return out


def serving_window(
    judged: Sequence[tuple[float, bool]],
    promoted: Sequence[float],
    start: float,
    end: float,
    side: str,
    min_count: int = 20,
) -> float | None:
    """``window_accuracy`` over [start, end) cut to one adapter's service: ``side='end'`` keeps what
    came after the last promotion before ``end``, ``side='start'`` what came before the first
    promotion after ``start``; the whole window when the cut leaves fewer than ``min_count``."""
    cut_start, cut_end = start, end
    if side == "end":
        cut_start = max([start] + [t for t in promoted if t < end])
    else:
        cut_end = min([end] + [t for t in promoted if t > start])
    if sum(cut_start <= t < cut_end for t, _ in judged) < min_count:
        return window_accuracy(judged, start, end)
    return window_accuracy(judged, cut_start, cut_end)


def window_accuracy(judged: Sequence[tuple[float, bool]], start: float, end: float) -> float | None:
    sel = [ok for t, ok in judged if start <= t < end]
    return sum(sel) / len(sel) if sel else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (numpy's default 'linear'), without numpy."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_bins(
    latencies: Sequence[tuple[float, float]], bin_s: float, min_count: int = 1
) -> list[tuple[float, float, float, int]]:
    """(bin centre, p50, p99, count) of ``latencies`` in bins of ``bin_s`` seconds; bins with fewer
    than ``min_count`` values are left out (a p99 of three values is their maximum)."""
    if not latencies:
        return []
    start = latencies[0][0]
    bins: dict[int, list[float]] = {}
    for t, ms in latencies:
        bins.setdefault(int((t - start) // bin_s), []).append(ms)
    return [
        (start + (k + 0.5) * bin_s, percentile(v, 50), percentile(v, 99), len(v))
        for k, v in sorted(bins.items())
        if len(v) >= min_count
    ]


def box_summary(box: BoxData) -> dict[str, Any]:
    judged = [ok for _, ok in box.judged]
    local = [a for a in box.promotions if a.origin == "local"]
    fleet = [a for a in box.promotions if a.origin == "fleet"]
    lat = [ms for _, ms in box.latencies]
    return {
        "database": str(box.path),
        "predictions": box.predictions,
        "judged_predictions": len(judged),
        "prequential_accuracy": round(sum(judged) / len(judged), 4) if judged else None,
        "samples": box.samples,
        "promoted_local": len(local),
        "promoted_fleet": len(fleet),
        "rejected": sum(a.status == "rejected" and not a.refresh for a in box.adapters),
        "fast_learner_refreshes_promoted": len(box.refreshes),
        "fast_learner_refreshes_refused": sum(a.status == "rejected" and a.refresh for a in box.adapters),
        "active_adapter": box.active_version,
        "uploads_acknowledged": sum(u.acked_at is not None for u in box.uploads),
        "latency_p50_ms": round(percentile(lat, 50), 2) if lat else None,
        "latency_p99_ms": round(percentile(lat, 99), 2) if lat else None,
    }


def fleet_summary(fleet: FleetData) -> dict[str, Any]:
    closed = [r for r in fleet.rounds if r.closed_at is not None]
    return {
        "sites": [b.name for b in fleet.boxes],
        "rounds_completed": len(closed) if fleet.rounds else None,
        "per_site": {b.name: box_summary(b) for b in fleet.boxes},
    }


# ---- plots ---------------------------------------------------------------------------------------

_ORIGIN_STYLE = {
    "local": ("tab:green", "promoted (trained on the box)"),
    "fleet": ("tab:purple", "promoted (fleet global)"),
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time_axis(ax: Any, t0: float) -> None:
    stamp = dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    ax.set_xlabel(f"time since {stamp} [s]")


def _draw_marks(ax: Any, fleet: FleetData, t0: float, label: bool) -> None:
    for name, t in fleet.marks:
        ax.axvline(t - t0, color="tab:red", linestyle="--", linewidth=1.5, label=name if label else None)


def plot_accuracy(fleet: FleetData, path: Path, window: int = DEFAULT_WINDOW) -> Path:
    """One panel per site: rolling prequential accuracy, marks (drift), promotions, refusals."""
    plt = _plt()
    t0 = fleet.t0()
    n = len(fleet.boxes)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.5 * n + 1.6), sharex=True, squeeze=False)
    legend: dict[str, Any] = {}
    for ax, box in zip(axes[:, 0], fleet.boxes, strict=True):
        series = rolling_accuracy(box.judged, window)
        if series:
            (line,) = ax.plot(
                [t - t0 for t, _ in series], [a for _, a in series], color="tab:blue", linewidth=1.6
            )
            legend.setdefault(f"prequential accuracy, last {window} records", line)
        else:
            ax.text(0.5, 0.5, "no predictions with feedback", transform=ax.transAxes, ha="center")
        for name, t in fleet.marks:
            legend.setdefault(name, ax.axvline(t - t0, color="tab:red", linestyle="--", linewidth=1.5))
        for a in box.promotions:
            color, text = _ORIGIN_STYLE.get(a.origin, ("tab:gray", f"promoted ({a.origin})"))
            legend.setdefault(text, ax.axvline(a.at - t0, color=color, linewidth=1.3, alpha=0.9))
            ax.annotate(
                a.version.removeprefix("fleet-"),
                (a.at - t0, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -3),
                textcoords="offset points",
                rotation=90,
                fontsize=7,
                color=color,
                ha="left",
                va="top",
            )
        for a in box.refreshes:
            legend.setdefault(
                "fast learner refreshed",
                ax.axvline(a.at - t0, color="tab:olive", linestyle=":", linewidth=0.8, alpha=0.7),
            )
        for origin, color, text in (
            ("local", "tab:gray", "local candidate refused by the gate"),
            ("fleet", "tab:purple", "fleet global refused by the gate"),
        ):
            refused = [
                a for a in box.adapters if a.status == "rejected" and a.origin == origin and not a.refresh
            ]
            if refused:
                (marks,) = ax.plot(
                    [a.at - t0 for a in refused], [0.04] * len(refused), "x", color=color, markersize=8
                )
                legend.setdefault(text, marks)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("accuracy")
        ax.text(
            0.005,
            0.96,
            box.name,
            transform=ax.transAxes,
            fontsize=10,
            fontweight="bold",
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
        ax.grid(True, alpha=0.3)
    _time_axis(axes[-1, 0], t0)
    fig.suptitle(
        "Accuracy per site over time (prequential: each labeled record classified before its label arrived)",
        fontsize=11,
    )
    fig.legend(
        list(legend.values()),
        list(legend.keys()),
        loc="upper center",
        ncol=3,
        fontsize=8,
        bbox_to_anchor=(0.5, 0.965),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(fleet: FleetData, path: Path, bin_s: float | None = None) -> Path:
    """p50 and p99 of inference latency per site per time bin, promotions marked."""
    plt = _plt()
    t0 = fleet.t0()
    fig, ax = plt.subplots(figsize=(11, 4.6))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    span = max((b.latencies[-1][0] - b.latencies[0][0] for b in fleet.boxes if b.latencies), default=0.0)
    bin_s = bin_s or max(5.0, round(span / 40.0))
    drawn = False
    for i, box in enumerate(fleet.boxes):
        rows = latency_bins(box.latencies, bin_s, MIN_BIN_COUNT)
        if not rows:
            continue
        drawn = True
        c = colors[i % len(colors)]
        xs = [r[0] - t0 for r in rows]
        ax.plot(xs, [r[1] for r in rows], color=c, linewidth=1.6, label=f"{box.name} p50")
        ax.plot(
            xs,
            [r[2] for r in rows],
            color=c,
            linewidth=1.0,
            linestyle=":",
            marker=".",
            label=f"{box.name} p99",
        )
        for a in box.promotions:
            ax.axvline(a.at - t0, color=c, alpha=0.25, linewidth=1)
    spans = [(a.started_at, a.decided_at) for b in fleet.boxes for a in b.adapters if a.started_at]
    for k, (start, stop) in enumerate(spans):
        ax.axvspan(
            start - t0,
            stop - t0,
            color="gray",
            alpha=0.12,
            linewidth=0,
            label="a local learner round (any site)" if k == 0 else None,
        )
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no latencies stored (an agent from before latency_ms?)",
            transform=ax.transAxes,
            ha="center",
        )
    _draw_marks(ax, fleet, t0, label=True)
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("latency [ms] (log scale)")
    _time_axis(ax, t0)
    ax.set_title(
        f"Inference latency per site: message received -> prediction made, p50 and p99 per {bin_s:.0f} s bin"
        f" (bins of {MIN_BIN_COUNT}+ predictions)\n(faint vertical lines: adapter promotions, i.e. hot swaps)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=7, ncol=3, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(fleet: FleetData, path: Path) -> Path:
    """Federated rounds: the aggregator's round spans, and per site its local training rounds,
    uploads (queued -> acknowledged) and the globals it judged."""
    plt = _plt()
    t0 = fleet.t0()
    rows = (["aggregator"] if fleet.rounds else []) + [b.name for b in fleet.boxes]
    fig, ax = plt.subplots(figsize=(11, 1.1 * len(rows) + 2.2))
    y = {name: len(rows) - 1 - i for i, name in enumerate(rows)}
    labelled: set[str] = set()

    def once(key: str, text: str) -> str | None:
        if key in labelled:
            return None
        labelled.add(key)
        return text

    end = max(
        [r.closed_at or r.opened_at for r in fleet.rounds]
        + [a.at for b in fleet.boxes for a in b.adapters]
        + [t for b in fleet.boxes for t, _ in b.judged[-1:]]
        + [t0]
    )
    for r in fleet.rounds:
        stop = r.closed_at if r.closed_at is not None else end
        ax.barh(
            y["aggregator"],
            stop - r.opened_at,
            left=r.opened_at - t0,
            height=0.5,
            color="tab:blue" if r.closed_at else "lightsteelblue",
            edgecolor="navy",
            label=once("round", "round open -> aggregated"),
        )
        text = f"r{r.id}" + (f": {r.participants} boxes" if r.participants else " (open)")
        ax.text(
            r.opened_at - t0 + (stop - r.opened_at) / 2,
            y["aggregator"],
            text,
            ha="center",
            va="center",
            fontsize=8,
            color="white" if r.closed_at else "navy",
        )
    for box in fleet.boxes:
        yy = y[box.name]
        for a in box.adapters:
            if a.origin == "local" and a.started_at is not None:
                ok = a.status != "rejected"
                ax.barh(
                    yy + 0.24,
                    a.decided_at - a.started_at,
                    left=a.started_at - t0,
                    height=0.2,
                    color="tab:olive" if ok else "lightgray",
                    edgecolor="tab:olive",
                    label=once(
                        "train" if ok else "train-no",
                        "local round, data read -> promoted" if ok else "local round, data read -> refused",
                    ),
                )
        for u in box.uploads:
            ax.plot(
                u.queued_at - t0,
                yy,
                marker="^",
                color="tab:orange",
                markersize=8,
                linestyle="none",
                label=once("queued", "upload queued (outbox)"),
            )
            if u.acked_at is not None:
                ax.plot([u.queued_at - t0, u.acked_at - t0], [yy, yy], color="tab:orange", linewidth=1.5)
                ax.plot(
                    u.acked_at - t0,
                    yy,
                    marker="o",
                    color="tab:orange",
                    markersize=6,
                    linestyle="none",
                    label=once("acked", "upload acknowledged by the aggregator"),
                )
                if u.round is not None:
                    ax.annotate(
                        f"r{u.round}",
                        (u.acked_at - t0, yy),
                        textcoords="offset points",
                        xytext=(4, 6),
                        fontsize=7,
                        color="tab:orange",
                    )
        for a in box.adapters:
            if a.origin != "fleet" or a.refresh:
                continue
            ok = a.status != "rejected"
            ax.plot(
                a.at - t0,
                yy - 0.22,
                marker="*" if ok else "X",
                markersize=11 if ok else 8,
                color="tab:purple",
                linestyle="none",
                label=once(
                    "g-ok" if ok else "g-no",
                    "fleet global promoted by the box's gate" if ok else "fleet global refused by the gate",
                ),
            )
    _draw_marks(ax, fleet, t0, label=True)
    ax.set_yticks(list(y.values()), list(y.keys()))
    ax.set_ylim(-0.7, len(rows) - 0.3)
    _time_axis(ax, t0)
    ax.set_title("Federated rounds: local training, uploads and the globals each site judged", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(rows) < 4 else -0.12), ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(fleet: FleetData, out: Path, window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """The three PNGs and ``report.json`` (the figures of ``fleet_summary``) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [
        plot_accuracy(fleet, out / ACCURACY_PNG, window),
        plot_latency(fleet, out / LATENCY_PNG),
        plot_rounds(fleet, out / ROUNDS_PNG),
    ]
    summary = fleet_summary(fleet)
    summary["plots"] = [p.name for p in files]
    return summary
