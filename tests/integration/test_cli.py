"""The commands a person types, run as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        input=input,
        timeout=300,
    )


def test_predict_prints_labels_with_adapter(tiny_bundle, random_adapter):
    r = _cli(
        "predict",
        "--bundle",
        str(tiny_bundle),
        "--adapter",
        str(random_adapter),
        "--json",
        "hydraulic pressure low",
        "belt replaced",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["hydraulic pressure low", "belt replaced"]
    assert all(row["adapter"] == "a1" and row["label"] == row["top_k"][0][0] for row in rows)


def test_predict_reads_stdin(tiny_bundle):
    r = _cli("predict", "--bundle", str(tiny_bundle), input="one\ntwo\n\nthree\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3


def test_inspect_reports_ok_and_detects_tampering(tiny_bundle, tmp_path):
    import shutil

    assert _cli("model", "inspect", str(tiny_bundle)).returncode == 0
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with (copy / "base.safetensors").open("ab") as f:
        f.write(b"x")
    r = _cli("model", "inspect", str(copy))
    assert r.returncode == 1 and "base_hash" in r.stderr


def test_predict_refuses_bad_adapter_with_a_sentence(tiny_bundle, tmp_path):
    r = _cli("predict", "--bundle", str(tiny_bundle), "--adapter", str(tmp_path), "x")
    assert r.returncode == 2 and "edge_adapter.json is missing" in r.stderr
