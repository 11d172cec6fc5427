"""The benchmark helpers: statistics, the interleaved runner, FLOP counting, tables, JSON, machine info."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from tools.bench import common


class FakeClock:
    """Each call advances time by the duration the running config set (ms -> s)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.next_ms = 0.0

    def __call__(self) -> float:
        self.now += self.next_ms / 1000.0
        self.next_ms = 0.0
        return self.now


def test_median_and_percentile_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 31):
        xs = rng.standard_normal(n).tolist()
        assert common.median(xs) == pytest.approx(float(np.median(xs)))
        for q in (0, 10, 50, 90, 99, 100):
            assert common.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_empty_statistics_are_nan_and_bad_percentile_raises():
    assert math.isnan(common.median([]))
    assert math.isnan(common.percentile([], 50))
    with pytest.raises(ValueError):
        common.percentile([1.0], 101)


def test_summary_and_ratio():
    s = common.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.n, s.median, s.min, s.max) == (5, 3.0, 1.0, 100.0)
    assert s.spread == pytest.approx((s.p90 - s.p10) / 3.0)
    assert common.ratio(6.0, 3.0) == 2.0
    assert math.isnan(common.ratio(1.0, 0.0))
    assert math.isnan(common.ratio(1.0, math.nan))


def test_rotated_orders():
    assert common.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert common.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert common.rotated(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert common.rotated([], 3) == []


def test_round_orders_are_seeded_permutations_with_varied_neighbours():
    names = ["a", "b", "c", "d", "e"]
    orders = common.round_orders(names, 40, seed=3)
    assert orders == common.round_orders(names, 40, seed=3)
    assert orders != common.round_orders(names, 40, seed=4)
    assert all(sorted(o) == names for o in orders)
    predecessors = {o[o.index("c") - 1] for o in orders if o.index("c") > 0}
    assert len(predecessors) > 1
    firsts = {o[0] for o in orders}
    assert len(firsts) > 1
    assert common.round_orders(names, 2, seed=None) == [names, ["b", "c", "d", "e", "a"]]


def test_run_interleaved_warmup_settle_and_durations():
    clock = FakeClock()
    calls: list[str] = []
    sleeps: list[float] = []
    durations = {"a": 5.0, "b": 10.0, "c": 1.0}

    def make(name):
        def fn():
            calls.append(name)
            clock.next_ms = durations[name]

        return fn

    configs = {name: make(name) for name in durations}
    rounds: list[int] = []
    samples = common.run_interleaved(
        configs,
        runs=4,
        warmup=2,
        settle_s=0.05,
        seed=7,
        clock=clock,
        sleep=sleeps.append,
        on_round=rounds.append,
    )
    # 2 warm-up rounds (rotations, no settle) then 4 timed rounds in the seeded shuffled orders.
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"]
    assert calls[6:] == [n for order in common.round_orders(list(durations), 4, seed=7) for n in order]
    assert sleeps == [0.05] * 12
    assert rounds == [0, 1, 2, 3]
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    for name, ms in durations.items():
        assert samples[name] == pytest.approx([ms] * 4)


def test_run_interleaved_rejects_zero_runs_and_time_calls_counts():
    with pytest.raises(ValueError):
        common.run_interleaved({"a": lambda: None}, runs=0)
    n = []
    out = common.time_calls(lambda: n.append(1), runs=3, warmup=2)
    assert len(out) == 3 and len(n) == 5 and all(x >= 0 for x in out)


def test_encoder_flops_minilm_b32s128():
    h, i, layers, b, s = 384, 1536, 6, 32, 128
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * s * h
    assert common.encoder_flops(b, s, h, i, layers) == per_token_layer * layers * b * s
    assert common.encoder_flops(b, s, h, i, layers) / 1e9 == pytest.approx(91.8, abs=0.1)
    # 1 GFLOP in 10 ms is 100 GFLOP/s.
    assert common.gflops_per_s(1e9, 10.0) == pytest.approx(100.0)


def test_json_line_is_one_strict_line():
    obj = {
        "a": np.float32(1.5),
        "b": np.int64(3),
        "c": float("nan"),
        "d": (1, 2),
        "e": np.arange(3),
        "f": {1: float("inf")},
        "g": True,
        "s": "x\ny",
    }
    line = common.json_line(obj)
    assert "\n" not in line
    assert json.loads(line) == {
        "a": 1.5,
        "b": 3,
        "c": None,
        "d": [1, 2],
        "e": [0, 1, 2],
        "f": {"1": None},
        "g": True,
        "s": "x\ny",
    }
    buf = io.StringIO()
    print("table first", file=buf)
    common.print_json_line({"k": 1}, file=buf)
    assert json.loads(buf.getvalue().splitlines()[-1]) == {"k": 1}


def test_jsonable_dataclass():
    s = common.summarize([1.0, 2.0])
    assert common.jsonable(s)["median"] == 1.5


def test_format_table_aligns_and_checks_width():
    text = common.format_table(["name", "ms"], [["torch", "12.5"], ["engine", "3.0"]])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(x) for x in lines}) == 1
    assert lines[1].endswith(":|")
    assert lines[2].startswith("| torch ") and lines[2].endswith(" 12.5 |")
    with pytest.raises(ValueError):
        common.format_table(["a", "b"], [["only one"]])
    assert common.fmt_num(math.nan) == "-" and common.fmt_num(1.234, 2) == "1.23"


def test_pin_thread_env_keeps_existing_values():
    env = {"OMP_NUM_THREADS": "4"}
    out = common.pin_thread_env(2, env)
    assert out["OMP_NUM_THREADS"] == "4" and out["OPENBLAS_NUM_THREADS"] == "2"
    assert set(out) == set(common.THREAD_ENV_VARS)


def test_machine_info_parses_cpuinfo():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\n"
    info = common.machine_info(2, cpuinfo_text=text)
    assert info["cpu"] == "AMD EPYC 9R14"
    assert info["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert info["threads"] == 2 and info["logical_cores"] >= 1
    assert "numpy" in info["versions"]
    json.loads(common.json_line(info))
