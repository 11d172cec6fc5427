from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent import exit_codes
from agent.config import (
    BootstrapConfig,
    ConfigError,
    RuntimeConfig,
    check_paths,
    json_schema,
    load_bootstrap,
    parse_bootstrap,
    parse_runtime,
    validate_config_file,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "edge-agent.toml"

MINIMAL = """
site = "s1"
device = "d1"
data_dir = "data"
bundle = "bundle"
[broker]
host = "localhost"
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(fn, *args) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    return e.value.errors


# ---- bootstrap --------------------------------------------------------------------------------


def test_example_config_is_valid():
    config = load_bootstrap(EXAMPLE)
    assert config.site == "plant-a"
    assert config.broker.port == 1884
    assert config.client_id == "edge-agent-plant-a-line3-box1"
    # relative paths are relative to the file, not to the working directory
    assert config.bundle == EXAMPLE.parent / "../build/bundle-minilm"


def test_minimal_config_defaults(tmp_path):
    config = load_bootstrap(write(tmp_path, MINIMAL))
    assert config.broker.port == 1883
    assert config.client_id == "edge-agent-s1-d1"
    assert config.data_dir == tmp_path / "data"
    assert config.db_path == tmp_path / "data" / "edge-agent.db"
    assert config.store.synchronous == "full"
    assert config.engine.intra_op_threads is None


def test_every_error_has_its_key_path(tmp_path):
    text = MINIMAL.replace('site = "s1"', 'site = "a/b"').replace(
        'host = "localhost"', "port = 70000\ncolour = 1"
    )
    errors = validate_config_file(write(tmp_path, text))
    joined = "\n".join(errors)
    assert any(e.startswith("site: ") for e in errors), joined
    assert any(e.startswith("broker.host: Field required") for e in errors), joined
    assert any(e.startswith("broker.port: ") and "70000" in e for e in errors), joined
    assert any(e.startswith("broker.colour: Extra inputs are not permitted") for e in errors), joined
    assert len(errors) == 4


def test_invalid_toml_names_the_file(tmp_path):
    p = write(tmp_path, "site = \n")
    (err,) = validate_config_file(p)
    assert str(p) in err and "invalid TOML" in err and "line 1" in err


def test_missing_file(tmp_path):
    (err,) = validate_config_file(tmp_path / "nope.toml")
    assert "cannot read" in err


def test_password_sources_are_exclusive(tmp_path):
    text = MINIMAL + 'username = "u"\npassword_file = "pw"\npassword_credential = "mqtt-password"\n'
    errors = validate_config_file(write(tmp_path, text))
    assert errors == ["broker: give password_file or password_credential, not both"]


def test_password_needs_username(tmp_path):
    errors = validate_config_file(write(tmp_path, MINIMAL + 'password_file = "pw"\n'))
    assert errors == ["broker: a password needs a username"]


def test_tls_cert_without_key(tmp_path):
    text = MINIMAL + '[broker.tls]\nca_file = "ca.pem"\ncert_file = "c.pem"\n'
    assert validate_config_file(write(tmp_path, text)) == [
        "broker.tls: cert_file and key_file must be given together"
    ]


def test_check_paths_reports_missing_files(tmp_path):
    text = MINIMAL + 'username = "u"\npassword_file = "pw"\n[broker.tls]\nca_file = "ca.pem"\n'
    errors = validate_config_file(write(tmp_path, text))
    assert any(e.startswith("broker.password_file: no such file") for e in errors)
    assert any(e.startswith("broker.tls.ca_file: no such file") for e in errors)
    assert any(e.startswith("bundle: no manifest.json") for e in errors)


def test_check_paths_clean_when_files_exist(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    (tmp_path / "pw").write_text("secret\n")
    config = load_bootstrap(write(tmp_path, MINIMAL + 'username = "u"\npassword_file = "pw"\n'))
    assert check_paths(config) == []
    assert config.broker.read_password() == "secret"


def test_password_credential_reads_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text("s3cret\nignored\n")
    config = parse_bootstrap(
        {
            "site": "s",
            "device": "d",
            "data_dir": str(tmp_path),
            "bundle": str(tmp_path),
            "broker": {"host": "h", "username": "u", "password_credential": "mqtt-password"},
        }
    )
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(OSError, match="CREDENTIALS_DIRECTORY"):
        config.broker.read_password()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.broker.read_password() == "s3cret"


def test_unwritable_data_dir(tmp_path):
    (tmp_path / "file").write_text("")
    config = parse_bootstrap(
        {
            "site": "s",
            "device": "d",
            "data_dir": str(tmp_path / "file" / "sub"),
            "bundle": "b",
            "broker": {"host": "h"},
        }
    )
    assert any(e.startswith("data_dir: ") for e in check_paths(config))


# ---- runtime ----------------------------------------------------------------------------------


def test_runtime_defaults_are_valid():
    config = parse_runtime({})
    assert config.version == 0
    assert config.inference.max_batch == 128 and config.inference.max_batch_tokens == 2048
    assert config == RuntimeConfig()


def test_runtime_rejects_with_key_paths():
    errors = errors_of(
        parse_runtime,
        {
            "version": 3,
            "inference": {"max_batch": 0, "top_k": "3"},
            "store": {"holdout_fraction": 0.9},
            "learning": {"schedule": ["7:00"], "drift": {"window": True}},
            "sync": {"participation": 2},
            "nope": {},
        },
    )
    paths = sorted(e.split(":")[0] for e in errors)
    assert paths == sorted(
        [
            "inference.max_batch",
            "inference.top_k",
            "store.holdout_fraction",
            "learning.schedule",
            "learning.drift.window",
            "sync.participation",
            "nope",
        ]
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_runtime_rejects_non_finite_numbers(bad):
    (err,) = errors_of(parse_runtime, {"version": 1, "inference": {"max_wait_ms": bad}})
    assert err.startswith("inference.max_wait_ms: ")


def test_runtime_is_strict_about_types():
    assert errors_of(parse_runtime, {"version": "1"})[0].startswith("version: ")
    assert errors_of(parse_runtime, {"version": 1, "store": {"store_text": 1}})[0].startswith(
        "store.store_text: "
    )
    # a JSON integer is a fine float
    assert parse_runtime({"version": 1, "inference": {"max_wait_ms": 1}}).inference.max_wait_ms == 1.0


def test_body_ignores_version():
    a = parse_runtime({"version": 1, "telemetry": {"interval_s": 5}})
    b = parse_runtime({"version": 2, "telemetry": {"interval_s": 5.0}})
    assert a.body() == b.body()
    assert a.body() != parse_runtime({"version": 2}).body()


def test_runtime_json_file_is_validated(tmp_path):
    assert validate_config_file(write(tmp_path, json.dumps({"version": 2}), "c.json")) == []
    (err,) = validate_config_file(write(tmp_path, '{"version": NaN}', "bad.json"))
    assert "invalid JSON" in err
    (err,) = validate_config_file(
        write(tmp_path, json.dumps({"version": 2, "telemetry": {"interval_s": 0}}), "c2.json")
    )
    assert err.startswith("telemetry.interval_s: ")


# ---- schema and descriptions ------------------------------------------------------------------


def _models(model: type[BaseModel], seen: set | None = None):
    seen = seen if seen is not None else set()
    if model in seen:
        return
    seen.add(model)
    yield model
    for field in model.model_fields.values():
        for arg in re.findall(r"[A-Za-z_]+", str(field.annotation)):
            sub = getattr(__import__("agent.config", fromlist=[arg]), arg, None)
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _models(sub, seen)


@pytest.mark.parametrize("root", [BootstrapConfig, RuntimeConfig])
def test_every_field_is_described_and_forbids_extras(root):
    models = list(_models(root))
    assert len(models) >= 4
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_json_schema_export():
    schema = json_schema("runtime")
    assert schema["title"] == "RuntimeConfig"
    assert schema["additionalProperties"] is False
    assert "max_batch" in schema["$defs"]["InferenceSettings"]["properties"]
    assert json_schema("bootstrap")["title"] == "BootstrapConfig"
    json.dumps(schema)  # serialisable


# ---- exit codes and the unit file ---------------------------------------------------------------


def test_config_error_exit_code_is_listed_in_the_unit():
    assert exit_codes.CONFIG_ERROR == 78
    unit = (ROOT / "systemd" / "edge-agent.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("RestartPreventExitStatus=")]
    listed = {int(v) for v in line.split("=", 1)[1].split()}
    assert set(exit_codes.NO_RESTART) <= listed


def test_bootstrap_types_are_not_coerced(tmp_path):
    errors = validate_config_file(write(tmp_path, MINIMAL + 'port = "1883"\nkeepalive_s = 30.5\n'))
    assert sorted(e.split(":")[0] for e in errors) == ["broker.keepalive_s", "broker.port"]


def test_example_hq_config_loads_and_bad_ones_say_where(tmp_path):
    from agent.fed.hq_config import load_hq_config

    hq = load_hq_config(ROOT / "examples" / "hq.toml")
    assert hq.fleet == "plant-fleet" and hq.rounds.strategy == "ffa_lora"
    assert hq.bundle.is_absolute() and hq.signing_key_file is not None and hq.signing_key_file.is_absolute()
    bad = tmp_path / "hq.toml"
    bad.write_text(
        (ROOT / "examples" / "hq.toml").read_text().replace('strategy = "ffa_lora"', 'strategy = "fedmagic"')
    )
    with pytest.raises(ConfigError) as e:
        load_hq_config(bad)
    assert any("fedmagic" in line for line in e.value.errors)


def test_fleet_section_needs_a_trusted_key(tmp_path):
    text = EXAMPLE.read_text() + '\n[fleet]\nid = "f1"\n'
    path = tmp_path / "box.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_bootstrap(path)
    assert any(line.startswith("fleet") and "public_key" in line for line in e.value.errors)
    path.write_text(text + 'public_key_files = ["keys/fleet.pub"]\n')
    assert load_bootstrap(path).fleet.public_key_paths() == [tmp_path / "keys" / "fleet.pub"]


def test_the_fleets_frozen_a_trains_at_its_own_learning_rate():
    from agent.config import RuntimeConfig
    from agent.daemon.settings import learner_settings

    s = learner_settings(RuntimeConfig.model_validate({"version": 1}))
    assert (s.lr, s.lr_frozen_a) == (1e-3, 1e-2)
    s = learner_settings(
        RuntimeConfig.model_validate({"version": 2, "learning": {"frozen_a_learning_rate": 3e-3}})
    )
    assert s.lr_frozen_a == 3e-3
