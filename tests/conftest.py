"""Shared fixtures: a tiny random BERT bundle built once per test session, and adapters for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from agent.build import build_bundle
    from tests.tiny import TINY_LABELS, make_tiny_bert

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_bert(root / "hf-model")
    out = root / "bundle"
    build_bundle(out, model_path=model, labels=TINY_LABELS)
    return out


@pytest.fixture(scope="session")
def random_adapter(tiny_bundle, tmp_path_factory) -> Path:
    from tests.tiny import make_random_adapter

    return make_random_adapter(tiny_bundle, tmp_path_factory.mktemp("adapters") / "a1", seed=1, version="a1")


@pytest.fixture(scope="session")
def random_adapter2(tiny_bundle, tmp_path_factory) -> Path:
    from tests.tiny import make_random_adapter

    return make_random_adapter(tiny_bundle, tmp_path_factory.mktemp("adapters") / "a2", seed=2, version="a2")


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    """More tiny bundles, each on its own random base (seed): new base models to release."""
    from agent.build import build_bundle
    from tests.tiny import TINY_LABELS, make_tiny_bert

    made: dict[int, Path] = {}

    def bundle(seed: int) -> Path:
        if seed not in made:
            root = tmp_path_factory.mktemp(f"tiny-{seed}")
            build_bundle(
                root / "bundle", model_path=make_tiny_bert(root / "hf-model", seed=seed), labels=TINY_LABELS
            )
            made[seed] = root / "bundle"
        return made[seed]

    return bundle
