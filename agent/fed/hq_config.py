"""``hq.toml``: the aggregator's config (``edge-agent aggregator run --config hq.toml``).

Same habits as the box's bootstrap file (``agent.config``): strict pydantic models, unknown keys
refused, every field described, relative paths relative to the file, errors with key paths.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from agent.config import CREDENTIALS_ENV, BrokerConfig, ConfigError, FsPath, _Section, format_errors
from agent.topics import SEGMENT_PATTERN


class RoundSettings(_Section):
    strategy: str = Field(
        "ffa_lora",
        description="aggregation strategy (agent.fed.strategies.STRATEGIES): ffa_lora is exact and "
        "halves uploads; *_trimmed_mean / *_median resist hostile boxes",
    )
    min_uploads: int = Field(
        3, ge=1, le=1_000_000, description="a round aggregates once this many boxes uploaded"
    )
    duration_s: float = Field(
        3600.0,
        gt=0,
        le=30 * 86400,
        description="a round aggregates what it has after this long (at least one upload)",
    )
    lora_seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="the fleet's seed of the frozen A (FFA-LoRA); default: drawn once and kept in the database",
    )
    rank: int | None = Field(
        None, ge=1, le=1024, description="product_svd: rank of the global (default: the bundle's)"
    )
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="trimmed-mean strategies: share cut at each end"
    )
    clip_median_factor: float | None = Field(
        None, gt=0, description="scale uploads whose norm exceeds this many times the round's median norm"
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="refuse an upload whose update norm exceeds this (absolute); none: no bound"
    )
    outlier_factor: float | None = Field(
        10.0,
        gt=1,
        description="at aggregation, leave out uploads whose norm exceeds this many times the round's "
        "median (with 3 or more uploads); none: keep all",
    )


class HqConfig(_Section):
    fleet: str = Field(pattern=SEGMENT_PATTERN, description="fleet id: the {fleet} level of fed/{fleet}/...")
    data_dir: FsPath = Field(description="writable directory for the aggregator's SQLite database")
    bundle: FsPath = Field(
        description="the fleet's model bundle (its manifest.json names base hash and shapes)"
    )
    signing_key_file: FsPath | None = Field(None, description="Ed25519 private key (PEM) that signs globals")
    signing_key_credential: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="name of a systemd credential (LoadCredential=) holding the signing key",
    )
    worker_id: str | None = Field(
        None, pattern=SEGMENT_PATTERN, description="this worker's name (default: hostname-pid)"
    )
    share_group: str = Field(
        "aggregators",
        pattern=SEGMENT_PATTERN,
        description="MQTT 5 shared-subscription group: workers of one group split the uploads",
    )
    chunk_bytes: int = Field(
        256 * 1024, ge=4096, le=1024 * 1024, description="globals are sent in chunks of this size"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    broker: BrokerConfig
    rounds: RoundSettings = Field(default_factory=RoundSettings)

    @model_validator(mode="after")
    def _one_key(self) -> HqConfig:
        if (self.signing_key_file is None) == (self.signing_key_credential is None):
            raise ValueError("give exactly one of signing_key_file or signing_key_credential")
        from agent.fed.strategies import STRATEGIES

        if self.rounds.strategy not in STRATEGIES:
            raise ValueError(
                f"rounds.strategy: unknown {self.rounds.strategy!r}; known: {sorted(STRATEGIES)}"
            )
        return self

    @property
    def worker(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "aggregator.db"

    def signing_key_path(self) -> Path:
        if self.signing_key_file is not None:
            return self.signing_key_file
        cred = os.environ.get(CREDENTIALS_ENV)
        if not cred:
            raise OSError(f"signing_key_credential set but ${CREDENTIALS_ENV} is not (run under systemd)")
        return Path(cred) / str(self.signing_key_credential)


def load_hq_config(path: Path) -> HqConfig:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
    try:
        config = HqConfig.model_validate(data)
    except ValueError as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            raise ConfigError(format_errors(e)) from None
        raise ConfigError([str(e)]) from None
    base = path.parent

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    broker = config.broker.model_copy(update={"password_file": fix(config.broker.password_file)})
    if broker.tls is not None:
        tls = broker.tls.model_copy(
            update={
                "ca_file": fix(broker.tls.ca_file),
                "cert_file": fix(broker.tls.cert_file),
                "key_file": fix(broker.tls.key_file),
            }
        )
        broker = broker.model_copy(update={"tls": tls})
    return config.model_copy(
        update={
            "data_dir": fix(config.data_dir),
            "bundle": fix(config.bundle),
            "signing_key_file": fix(config.signing_key_file),
            "broker": broker,
        }
    )
