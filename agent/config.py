"""One validated config tree: the bootstrap TOML file and the runtime config sent over MQTT.

``BootstrapConfig`` is what the box needs before it can talk to anyone (broker, ids, paths); it
comes from the TOML file given to ``edge-agent run --config`` and changes only with a restart.
``RuntimeConfig`` is the desired state published (retained) on ``edge/{site}/{device}/config``:
batching, thresholds, storage limits, learning triggers, sync, telemetry. It is versioned,
persisted in SQLite and applied live; a rejected one changes nothing.

Every model forbids unknown keys and describes each field, so ``edge-agent config-schema`` is the
reference for operators.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from agent.topics import SEGMENT_PATTERN

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class _Section(BaseModel):
    # TOML has types: "1883" for a port is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Paths are the one exception to strictness: TOML gives strings.
FsPath = Annotated[Path, Strict(False)]


class _RuntimeSection(BaseModel):
    # Runtime config arrives as JSON: no string-to-number coercion, no NaN or infinities.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# ---- bootstrap (TOML) -----------------------------------------------------------------------


class TlsConfig(_Section):
    ca_file: FsPath = Field(description="PEM file of the CA that signed the broker's certificate")
    cert_file: FsPath | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key_file: FsPath | None = Field(None, description="private key (PEM) of cert_file")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class BrokerConfig(_Section):
    host: str = Field(min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual with TLS)")
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="MQTT client id; must be stable across restarts so the broker keeps the session "
        "(default: edge-agent-{site}-{device})",
    )
    username: str | None = Field(None, min_length=1, description="user name, if the broker wants one")
    password_file: FsPath | None = Field(
        None, description="file whose first line is the password (not with password_credential)"
    )
    password_credential: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="name of a systemd credential (LoadCredential=) holding the password, read from "
        "$CREDENTIALS_DIRECTORY/NAME (not with password_file)",
    )
    tls: TlsConfig | None = Field(None, description="TLS settings; plain TCP when absent")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds")
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        le=0xFFFFFFFF,
        description="how long the broker keeps the session (subscriptions and queued QoS 1 messages) "
        "while the box is offline; the broker's own queue limits (examples/mosquitto.conf: 1 h at "
        "100 messages/s) bound what it keeps",
    )
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="QoS 1 messages the broker may have in flight to this box before it acks; samples "
        "are acked only after their commit, so this bounds both memory and ingest rate",
    )
    read_sys_dropped: bool = Field(
        True,
        description="subscribe to mosquitto's $SYS/broker/publish/messages/dropped (messages dropped "
        "from full queues, all clients, since the broker started), log when it grows and report it "
        "in telemetry; turn off where the broker's ACL forbids $SYS",
    )
    reconnect_min_delay_s: float = Field(1.0, gt=0, le=60, description="first reconnect delay")
    reconnect_max_delay_s: float = Field(60.0, gt=0, le=3600, description="reconnect delay ceiling (backoff)")

    @model_validator(mode="after")
    def _one_password_source(self) -> BrokerConfig:
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("give password_file or password_credential, not both")
        if (self.password_file or self.password_credential) and not self.username:
            raise ValueError("a password needs a username")
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        return self

    def password_path(self) -> Path | None:
        if self.password_file is not None:
            return self.password_file
        if self.password_credential is not None:
            cred_dir = os.environ.get(CREDENTIALS_ENV)
            if not cred_dir:
                return None
            return Path(cred_dir) / self.password_credential
        return None

    def read_password(self) -> str | None:
        """The password, or None when none is configured. Raises OSError if the file is unreadable."""
        if self.password_file is None and self.password_credential is None:
            return None
        path = self.password_path()
        if path is None:
            raise OSError(
                f"password_credential {self.password_credential!r} set but ${CREDENTIALS_ENV} is not "
                "(run under systemd with LoadCredential=, or use password_file)"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else ""


class EngineSettings(_Section):
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="model precision; auto measures int8 against fp32 on this CPU, fp16 on CUDA"
    )
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="ONNX Runtime execution provider; auto takes the best one available"
    )
    intra_op_threads: int | None = Field(
        None, ge=1, le=256, description="ONNX Runtime intra-op threads (default: physical cores)"
    )
    adapter_dir: FsPath | None = Field(
        None, description="LoRA adapter directory to activate at start (the learner issue manages these)"
    )


class StoreBootstrap(_Section):
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: full survives power loss after an ack; normal only a "
        "crash of the process",
    )
    busy_timeout_ms: int = Field(
        2000, ge=0, le=60000, description="how long a write waits for a locked database before it fails"
    )
    commit_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="a lone sample waits this long for others to share its transaction (group commit)",
    )
    max_batch: int = Field(512, ge=1, le=100000, description="most messages committed in one transaction")


class FleetConfig(_Section):
    id: str = Field(
        pattern=SEGMENT_PATTERN, description="fleet id: the {fleet} level of fed/{fleet}/... topics"
    )
    public_key_files: list[FsPath] = Field(
        default_factory=list,
        max_length=16,
        description="Ed25519 public keys (PEM) whose signatures on global adapters this box trusts; "
        "list the old and the new key while rotating",
    )
    public_key_credential: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="name of a systemd credential (LoadCredential=) holding one more trusted public key",
    )
    max_outbox_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="disk quota of uploads queued for headquarters; beyond it the oldest are dropped "
        "(and counted)",
    )
    chunk_bytes: int = Field(
        256 * 1024,
        ge=4096,
        le=1024 * 1024,
        description="uploads are sent in chunks of at most this many bytes (below the broker's "
        "max_packet_size)",
    )
    max_bundle_bytes: int = Field(
        2 * 1024**3,
        ge=1024 * 1024,
        description="disk quota of a new base model being fetched from headquarters (the default "
        "bundle is ~280 MB)",
    )

    @model_validator(mode="after")
    def _some_key(self) -> FleetConfig:
        if not self.public_key_files and self.public_key_credential is None:
            raise ValueError("give public_key_files or public_key_credential: unsigned globals are refused")
        return self

    def public_key_paths(self) -> list[Path]:
        paths = list(self.public_key_files)
        cred_dir = os.environ.get(CREDENTIALS_ENV)
        if self.public_key_credential is not None and cred_dir:
            paths.append(Path(cred_dir) / self.public_key_credential)
        return paths


class BootstrapConfig(_Section):
    site: str = Field(pattern=SEGMENT_PATTERN, description="plant id: the {site} level of every topic")
    device: str = Field(pattern=SEGMENT_PATTERN, description="box id: the {device} level of every topic")
    data_dir: FsPath = Field(description="writable directory for the SQLite store and snapshots")
    bundle: FsPath = Field(description="model bundle directory (built by `edge-agent model build`)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    broker: BrokerConfig = Field(description="MQTT broker connection")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="inference engine set-up")
    store: StoreBootstrap = Field(default_factory=StoreBootstrap, description="SQLite set-up")
    fleet: FleetConfig | None = Field(
        None, description="the federated fleet this box belongs to; without it the box never syncs"
    )

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"edge-agent-{self.site}-{self.device}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "edge-agent.db"


# ---- runtime (MQTT, JSON) -------------------------------------------------------------------


class InferenceSettings(_RuntimeSection):
    max_batch: int = Field(
        128, ge=1, le=1024, description="most texts the engine takes and sorts by length at once"
    )
    max_batch_tokens: int = Field(
        2048,
        ge=16,
        le=65536,
        description="most padded tokens in one ONNX Runtime run (short texts share runs)",
    )
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="how long a batch waits for more texts, under load only"
    )
    top_k: int = Field(3, ge=1, le=100, description="labels returned with each prediction")
    cache_size: int = Field(4096, ge=0, le=1_000_000, description="predictions cached by text (0: off)")
    low_confidence_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="predictions scoring below this are published with uncertain=true (0: never)",
    )
    max_requests_per_s: float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="infer/req messages answered per second (token bucket, bursts up to one second's "
        "worth); beyond it requests are answered rate_limited at once without running the model, so "
        "a flooding device cannot take the box's CPU (0: no limit)",
    )


class StoreSettings(_RuntimeSection):
    store_text: bool = Field(
        True, description="store the text of classified events; false keeps only its sha256"
    )
    max_samples: int = Field(
        1_000_000, ge=100, description="labeled samples kept; beyond it the oldest training samples go first"
    )
    max_sample_bytes: int = Field(
        512 * 1024 * 1024, ge=1024 * 1024, description="UTF-8 bytes of sample texts kept (same order)"
    )
    holdout_fraction: float = Field(
        0.1,
        ge=0.0,
        le=0.5,
        description="share of samples, per label, set aside for evaluation; retention keeps this share",
    )
    max_predictions: int = Field(
        1_000_000, ge=100, description="stored event predictions kept, oldest dropped first"
    )
    prediction_retention_days: float = Field(
        30.0, gt=0, le=3650, description="event predictions older than this are dropped"
    )
    max_feedback: int = Field(1_000_000, ge=100, description="feedback rows kept, oldest dropped first")


class DriftSettings(_RuntimeSection):
    enabled: bool = Field(False, description="train when the prediction distribution drifts")
    threshold: float = Field(
        0.2, gt=0, le=10, description="population stability index of predicted labels that counts as drift"
    )
    window: int = Field(
        1000, ge=50, le=1_000_000, description="recent predictions compared with the reference"
    )


class LearningSettings(_RuntimeSection):
    """Used by the learner (issue: online LoRA training); the daemon stores and reports them."""

    enabled: bool = Field(False, description="let the learner train adapters on this box")
    min_new_samples: int = Field(
        200, ge=1, le=10_000_000, description="train when this many new labeled samples arrived"
    )
    accuracy_drop: float = Field(
        0.05, gt=0, le=1, description="train when holdout accuracy falls this much below the last adapter's"
    )
    drift: DriftSettings = Field(default_factory=DriftSettings, description="drift trigger")
    schedule: list[str] = Field(
        default_factory=list,
        max_length=48,
        description='daily training times, "HH:MM" in UTC (empty: no schedule)',
    )
    max_cpu_percent: float = Field(
        70.0, gt=0, le=100, description="resource guard: the learner starts only below this CPU load"
    )
    max_temperature_c: float = Field(
        80.0, gt=0, le=130, description="resource guard: the learner pauses above this CPU/GPU temperature"
    )
    min_free_memory_mb: int = Field(
        1024, ge=0, description="resource guard: the learner starts only with this much memory free"
    )
    max_inference_p99_ms: float = Field(
        250.0, gt=0, description="resource guard: the learner starts only while inference p99 is below this"
    )
    min_interval_s: float = Field(
        60.0, ge=0, le=7 * 86400, description="least time between two training rounds"
    )
    epochs: int = Field(8, ge=1, le=100, description="epochs per round (early stopping may end it sooner)")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate for LoRA and head")
    frozen_a_learning_rate: float = Field(
        1e-2,
        gt=0,
        le=1,
        description="AdamW learning rate while the fleet's strategy freezes A (FFA-LoRA): only B and the "
        "head learn and they need the larger step (arXiv 2403.12313; at 1e-3 the fleet benchmark's FFA "
        "global stayed 26 points under local training after 4 rounds)",
    )
    batch_size: int = Field(16, ge=1, le=512, description="training batch size")
    anchor_lambda: float = Field(
        1e-3,
        ge=0,
        le=100,
        description="weight of the pull ||theta - theta*||^2 toward the fleet (or active) adapter",
    )
    distill_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="weight of distilling the fleet (or active) model's predictions where they are right",
    )
    fast_learner: bool = Field(
        True,
        description="fit the fast linear learner (hashed n-grams) beside each round; the gate then "
        "chooses what serves among transformer, linear and combined",
    )
    fast_learner_refresh_samples: int = Field(
        50,
        ge=0,
        le=1_000_000,
        description="between rounds, refit the fast learner alone once this many new labeled samples "
        "arrived (0: only with rounds); the same gate judges it, its LoRA weights stay",
    )
    fast_learner_refresh_interval_s: float = Field(
        30.0, ge=0, le=7 * 86400, description="least time between two fast-learner refreshes"
    )
    replay_fraction: float = Field(
        0.5, ge=0, lt=1, description="share of each round's data replayed from older samples, class-balanced"
    )
    max_train_samples: int = Field(4000, ge=10, le=1_000_000, description="newest samples used per round")
    time_budget_s: float = Field(600.0, ge=10, le=86400, description="a round stops training after this long")
    threads: int = Field(1, ge=1, le=64, description="torch threads of the learner process")
    gate_epsilon: float = Field(
        0.02, ge=0, le=1, description="promotion gate: overall holdout accuracy may fall by at most this"
    )
    gate_delta: float = Field(
        0.10, ge=0, le=1, description="promotion gate: no class may fall by more than this"
    )
    rollback_min_feedback: int = Field(
        50, ge=1, description="automatic rollback: feedback on the new adapter needed before judging it"
    )
    rollback_max_drop: float = Field(
        0.05, gt=0, le=1, description="automatic rollback: live accuracy below promoted accuracy minus this"
    )
    keep_versions: int = Field(5, ge=1, le=1000, description="old adapter versions kept on disk for rollback")

    @field_validator("schedule")
    @classmethod
    def _times(cls, value: list[str]) -> list[str]:
        for t in value:
            if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", t):
                raise ValueError(f'{t!r} is not a time "HH:MM" (00:00 to 23:59)')
        return value


class SyncSettings(_RuntimeSection):
    """Federated sync with the fleet's aggregator (``agent.fed.client``). Which fleet, and whose
    signatures to trust, are in the bootstrap file (``[fleet]``): a message cannot change them."""

    enabled: bool = Field(
        False, description="take part in federated rounds (needs the bootstrap file's [fleet] section)"
    )
    participation: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of rounds this box uploads to (decided per round from the round id and device, "
        "so a restart decides the same)",
    )
    strategy: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="take part only in rounds of this aggregation strategy (default: whatever the "
        "aggregator announces)",
    )
    min_examples: int = Field(
        100, ge=1, description="upload an adapter only when it was trained on at least this many examples"
    )
    upload_interval_s: int = Field(
        60, ge=0, le=7 * 86400, description="least time between two uploads of this box"
    )
    resend_after_s: float = Field(
        30.0,
        ge=1.0,
        le=86400.0,
        description="an upload the aggregator has not acknowledged is sent again after this long",
    )
    bundle_policy: Literal["train_first", "switch_now", "never"] = Field(
        "train_first",
        description="a new base model from headquarters: train_first learns a first adapter for it "
        "from the stored samples and switches only if that passes the gate against what serves now; "
        "switch_now switches once it is verified and tried (serving without an adapter until one is "
        "learned); never keeps the current base",
    )
    adopt_global: bool = Field(
        True,
        description="evaluate each verified global adapter on this box's holdout and promote it "
        "when it does not regress; false: use it only as the anchor of local training",
    )


class TelemetrySettings(_RuntimeSection):
    interval_s: float = Field(30.0, ge=1.0, le=3600.0, description="seconds between telemetry messages")
    gpu: bool = Field(True, description="include NVML GPU figures when NVML is available")


class RuntimeConfig(_RuntimeSection):
    version: int = Field(
        0,
        ge=0,
        description="monotonic version of this desired state; published configs start at 1 "
        "(0 is the built-in default)",
    )
    inference: InferenceSettings = Field(
        default_factory=InferenceSettings, description="batching and thresholds"
    )
    store: StoreSettings = Field(default_factory=StoreSettings, description="storage limits and retention")
    learning: LearningSettings = Field(default_factory=LearningSettings, description="learning triggers")
    sync: SyncSettings = Field(default_factory=SyncSettings, description="federated sync")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings, description="health reports")

    def body(self) -> dict[str, Any]:
        """Everything but the version: two configs with equal bodies configure the same thing."""
        return self.model_dump(mode="json", exclude={"version"})


# ---- loading and errors ---------------------------------------------------------------------


class ConfigError(ValueError):
    """A config that failed validation; ``errors`` holds one line per problem, each with its key path."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def format_errors(error: ValidationError) -> list[str]:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    for e in error.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if (
            e["type"] not in ("missing", "extra_forbidden")
            and "input" in e
            and not isinstance(e["input"], dict)
        ):
            got = e["input"]
            if isinstance(got, float) and not math.isfinite(got):
                got = str(got)
            msg += f" (got {json.dumps(got, default=str)[:80]})"
        lines.append(f"{path}: {msg}")
    return lines


def parse_bootstrap(data: dict[str, Any]) -> BootstrapConfig:
    try:
        return BootstrapConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None


def parse_runtime(data: Any) -> RuntimeConfig:
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None


def load_bootstrap(path: Path) -> BootstrapConfig:
    """Read and validate a bootstrap TOML file. Raises ConfigError with every problem."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
    config = parse_bootstrap(data)
    # Relative paths are relative to the config file, not to wherever the service was started.
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: BootstrapConfig, base: Path) -> BootstrapConfig:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    broker = config.broker
    tls = broker.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                "ca_file": fix(tls.ca_file),
                "cert_file": fix(tls.cert_file),
                "key_file": fix(tls.key_file),
            }
        )
    broker = broker.model_copy(update={"tls": tls, "password_file": fix(broker.password_file)})
    engine = config.engine.model_copy(update={"adapter_dir": fix(config.engine.adapter_dir)})
    fleet = config.fleet
    if fleet is not None:
        fleet = fleet.model_copy(update={"public_key_files": [fix(p) for p in fleet.public_key_files]})
    return config.model_copy(
        update={
            "data_dir": fix(config.data_dir),
            "bundle": fix(config.bundle),
            "broker": broker,
            "engine": engine,
            "fleet": fleet,
        }
    )


def check_paths(config: BootstrapConfig) -> list[str]:
    """Problems with the files a valid config names: what `run` would trip over at start."""
    problems = []
    files = {"broker.password_file": config.broker.password_file}
    if config.broker.password_credential and os.environ.get(CREDENTIALS_ENV):
        files["broker.password_credential"] = config.broker.password_path()
    if config.broker.tls is not None:
        files["broker.tls.ca_file"] = config.broker.tls.ca_file
        files["broker.tls.cert_file"] = config.broker.tls.cert_file
        files["broker.tls.key_file"] = config.broker.tls.key_file
    if config.fleet is not None:
        for i, key_path in enumerate(config.fleet.public_key_paths()):
            files[f"fleet.public_key_files[{i}]"] = key_path
    for key, path in files.items():
        if path is not None and not path.is_file():
            problems.append(f"{key}: no such file: {path}")
    if config.broker.tls is not None:
        from agent.ops.certs import tls_problems  # cryptography: only when there is TLS to check

        tls = config.broker.tls
        problems += tls_problems(tls.ca_file, tls.cert_file, tls.key_file)
    if not (config.bundle / "manifest.json").is_file():
        problems.append(
            f"bundle: no manifest.json in {config.bundle} (build one with `edge-agent model build`)"
        )
    if config.engine.adapter_dir is not None and not config.engine.adapter_dir.is_dir():
        problems.append(f"engine.adapter_dir: no such directory: {config.engine.adapter_dir}")
    data_dir = config.data_dir
    existing = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        problems.append(f"data_dir: {data_dir} cannot be created")
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"data_dir: {existing} is not writable")
    return problems


def validate_config_file(path: Path) -> list[str]:
    """Every problem with a config file, each with its key path; empty when it is good.

    ``*.json`` files are checked as runtime configs (what would be published on ``config``),
    anything else as the bootstrap TOML, including whether the files it names exist.
    """
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes(), parse_constant=_reject_constant)
        except OSError as e:
            return [f"{path}: cannot read: {e.strerror or e}"]
        except (ValueError, UnicodeDecodeError) as e:
            return [f"{path}: invalid JSON: {e}"]
        try:
            parse_runtime(data)
        except ConfigError as e:
            return e.errors
        return []
    try:
        config = load_bootstrap(path)
    except ConfigError as e:
        return e.errors
    return check_paths(config)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def json_schema(which: Literal["runtime", "bootstrap"] = "runtime") -> dict[str, Any]:
    model = RuntimeConfig if which == "runtime" else BootstrapConfig
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
