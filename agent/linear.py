"""The fast learner: a linear model over hashed word and character n-grams, beside the transformer.

On keyword-heavy plant text TF-IDF + logistic regression is hard to beat and recovers from drift
with fewer samples than LoRA (README, On-box learning). This is that model, made to live on a box:

* features are hashed (scikit-learn's ``HashingVectorizer``), so every box shares one feature space
  and needs no vocabulary: linear models of the fleet average exactly (FedAvg of ``coef`` is the
  average of the models' scores) once they share one ``idf``. Sublinear term frequency times an idf
  learned from the box's samples (0 for features never seen, as TF-IDF drops unknown terms), each
  analyzer's block L2-normalised;
* the artifact is arrays, not pickle: ``linear_model.safetensors`` (``coef`` [labels, features],
  ``intercept`` [labels], ``idf`` [features]) plus ``linear_config.json`` (hash space, n-gram
  ranges, analyzer settings, labels, format version, the combination weight). It lives in the
  adapter's directory, so it hot-swaps and rolls back with the adapter as one unit;
* what serves is written by the gate into ``serving.json`` in the same directory: ``transformer``,
  ``linear`` or ``combined`` (weighted log-probabilities, the weight fitted by the learner).

Inference needs numpy, scipy and scikit-learn's vectorizer only: no torch. ``fit_linear`` is for the
learner process.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.adapters import AdapterError

LINEAR_WEIGHTS = "linear_model.safetensors"
LINEAR_CONFIG = "linear_config.json"
SERVING = "serving.json"
FORMAT_VERSION = 1
# What an adapter unit can serve; "crf" is a token-classification bundle's fast entity learner
# (agent.entity_crf), the others a classifier's.
MODELS = ("transformer", "linear", "combined", "crf")
MAX_LINEAR_BYTES = 64 << 20
# A class the training data never showed: finite, and never the answer.
_ABSENT_INTERCEPT = -30.0


class LinearModelError(AdapterError):
    """A linear model that must not be served; the message says why."""


@dataclass
class LinearConfig:
    labels: list[str]
    version: str = ""
    format_version: int = FORMAT_VERSION
    # Per analyzer. 2**17 word + 2**17 char features: ~1 MB per label in fp32, few collisions on
    # plant vocabularies (a few thousand distinct word n-grams, tens of thousands of char n-grams).
    n_features: int = 1 << 17
    word_ngram: tuple[int, int] = (1, 2)
    char_ngram: tuple[int, int] = (2, 5)
    char_analyzer: str = "char_wb"
    lowercase: bool = True
    sublinear_tf: bool = True
    c: float = 10.0  # inverse L2 strength of the logistic regression (as the TF-IDF baseline)
    weight: float = 0.5  # the linear model's share of the combined log-probabilities
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinearConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise LinearModelError(f"{LINEAR_CONFIG}: unknown fields {sorted(unknown)}")
        if data.get("format_version") != FORMAT_VERSION:
            raise LinearModelError(
                f"{LINEAR_CONFIG}: format_version {data.get('format_version')!r}, this agent reads {FORMAT_VERSION}"
            )
        try:
            cfg = cls(**data)
            cfg.word_ngram = _ngram(cfg.word_ngram)
            cfg.char_ngram = _ngram(cfg.char_ngram)
        except (TypeError, ValueError) as e:
            raise LinearModelError(f"{LINEAR_CONFIG}: {e}") from e
        if (
            not isinstance(cfg.labels, list)
            or not cfg.labels
            or not all(isinstance(x, str) for x in cfg.labels)
        ):
            raise LinearModelError(f"{LINEAR_CONFIG}: labels must be a non-empty list of strings")
        if len(set(cfg.labels)) != len(cfg.labels):
            raise LinearModelError(f"{LINEAR_CONFIG}: labels repeat")
        if not isinstance(cfg.n_features, int) or not 1 <= cfg.n_features <= 1 << 22:
            raise LinearModelError(f"{LINEAR_CONFIG}: n_features must be an integer in [1, 2**22]")
        if cfg.char_analyzer not in ("char", "char_wb"):
            raise LinearModelError(f"{LINEAR_CONFIG}: char_analyzer must be 'char' or 'char_wb'")
        if not isinstance(cfg.weight, int | float) or not 0.0 <= cfg.weight <= 1.0:
            raise LinearModelError(f"{LINEAR_CONFIG}: weight must be a number in [0, 1]")
        return cfg


def _ngram(value: Any) -> tuple[int, int]:
    lo, hi = value
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 8):
        raise ValueError(f"n-gram range {value!r} must be two integers 1 <= lo <= hi <= 8")
    return (lo, hi)


class LinearModel:
    """Hashed n-gram features and a multinomial logistic model; numpy + scipy at inference."""

    def __init__(self, config: LinearConfig, coef: np.ndarray, intercept: np.ndarray, idf: np.ndarray):
        self.config = config
        self.coef = coef
        self.intercept = intercept
        self.idf = idf
        self._w = np.ascontiguousarray(coef.T)  # [features, labels]: X @ W on a sparse X
        self._vectorizers = _vectorizers(config)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def features(self, texts: list[str]):
        """Sparse [texts, 2 * n_features]: per analyzer, sublinear tf x idf, L2-normalised."""
        return _features(self._vectorizers, self.config, self.idf, texts)

    def log_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.config.labels)), np.float32)
        n = self.config.n_features
        scores = np.tile(self.intercept, (len(texts), 1))
        for i, (d, indices, indptr) in enumerate(
            _block_arrays(self._vectorizers, self.config, self.idf, texts)
        ):
            # Gather the rows of W each text uses and sum per text: no sparse matrix objects,
            # whose construction costs more than the product on a batch of one.
            starts = indptr[:-1]
            used = np.diff(indptr) > 0
            if used.any():
                contrib = self._w[i * n + indices] * d[:, None]
                scores[used] += np.add.reduceat(contrib, starts[used], axis=0)
        return log_softmax(scores)

    def predict(self, texts: list[str]) -> list[str]:
        labels = self.config.labels
        return [labels[i] for i in self.log_proba(texts).argmax(axis=1)]


def preload() -> None:
    """Import what serving a fast learner needs (scikit-learn's vectorizer, scipy.sparse: ~75 MB
    resident). The daemon calls it at start when the fast learner is on, so its memory is what it
    will be from the start, instead of stepping up at the first promotion hours later (a box that
    cannot afford it then fails at start, and the chaos soak's RSS trend measures leaks, not this)."""
    import scipy.sparse  # noqa: F401
    from sklearn.feature_extraction.text import HashingVectorizer  # noqa: F401


def _vectorizers(config: LinearConfig) -> list[Any]:
    from sklearn.feature_extraction.text import HashingVectorizer

    common = {
        "n_features": config.n_features,
        "alternate_sign": False,
        "norm": None,
        "lowercase": config.lowercase,
        "dtype": np.float32,
    }
    return [
        HashingVectorizer(analyzer="word", ngram_range=config.word_ngram, **common),
        HashingVectorizer(analyzer=config.char_analyzer, ngram_range=config.char_ngram, **common),
    ]


def _block_arrays(
    vectorizers: list[Any], config: LinearConfig, idf: np.ndarray, texts: list[str]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per analyzer, the CSR arrays (data, indices, indptr) of [texts, n_features]: sublinear tf x
    idf, rows L2-normalised. On the arrays directly: scipy's elementwise operators cost ~1 ms a
    batch-1 call."""
    n = config.n_features
    out = []
    for i, vec in enumerate(vectorizers):
        x = vec.transform(texts)
        d = x.data.astype(np.float32, copy=False)
        if config.sublinear_tf:
            np.log1p(d, out=d)
        d *= idf[i * n : (i + 1) * n][x.indices]
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        norms = np.sqrt(np.bincount(rows, weights=d * d, minlength=x.shape[0])).astype(np.float32)
        norms[norms == 0] = 1.0
        d /= norms[rows]
        out.append((d, x.indices, x.indptr))
    return out


def _features(vectorizers: list[Any], config: LinearConfig, idf: np.ndarray, texts: list[str]):
    import scipy.sparse as sp

    n = config.n_features
    blocks = [
        sp.csr_matrix(arrays, shape=(len(texts), n))
        for arrays in _block_arrays(vectorizers, config, idf, texts)
    ]
    return sp.hstack(blocks, format="csr")


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def combine_log_probs(transformer: np.ndarray, linear: np.ndarray, weight: float | np.ndarray) -> np.ndarray:
    """``(1 - w) log p_transformer + w log p_linear``, renormalised: a product of experts (``weight``
    a number, or one per row as a column)."""
    return log_softmax((1.0 - weight) * log_softmax(transformer) + weight * linear)


def fit_weight(transformer_logits: np.ndarray, linear_lp: np.ndarray, y: np.ndarray) -> float:
    """The linear share in [0, 1] (steps of 0.05) with the best accuracy on held-out rows; ties go
    to the lower log-loss. Without rows: 0.5."""
    if len(y) == 0:
        return 0.5
    best: tuple[float, float, float] | None = None
    for w in np.linspace(0.0, 1.0, 21):
        lp = combine_log_probs(transformer_logits, linear_lp, float(w))
        acc = float((lp.argmax(axis=1) == y).mean())
        nll = float(-lp[np.arange(len(y)), y].mean())
        key = (acc, -nll, float(w))
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return round(best[2], 4)


def crossfit_weight(
    transformer_logits: np.ndarray, linear_lp: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray]:
    """The linear share fitted on all rows (``fit_weight``: what serves), and per row the share
    fitted on the other half of the rows (even rows get the odd rows' fit and the reverse), so that
    the combination's accuracy on these rows is measured out of sample. Under four rows: the
    all-rows fit for each."""
    w = fit_weight(transformer_logits, linear_lp, y)
    n = len(y)
    if n < 4:
        return w, np.full(n, w)
    even = np.arange(n) % 2 == 0
    w_for_even = fit_weight(transformer_logits[~even], linear_lp[~even], y[~even])
    w_for_odd = fit_weight(transformer_logits[even], linear_lp[even], y[even])
    return w, np.where(even, w_for_even, w_for_odd)


def fit_linear(
    texts: list[str], labels: list[str], all_labels: list[str], config: LinearConfig | None = None
) -> LinearModel:
    """Fit features' idf and a multinomial logistic regression on (texts, labels); seconds on a few
    thousand rows. Needs at least two classes."""
    from sklearn.linear_model import LogisticRegression

    config = config or LinearConfig(labels=list(all_labels))
    config.labels = list(all_labels)
    index = {lab: i for i, lab in enumerate(all_labels)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels not in the bundle's label set: {unknown}")
    present = sorted(set(labels), key=index.__getitem__)
    if len(present) < 2:
        raise ValueError(f"a linear model needs at least two classes, got {present}")
    n = config.n_features
    vectorizers = _vectorizers(config)
    # Document frequencies on the raw counts, then the idf TfidfVectorizer would use (smooth).
    counts = [vec.transform(texts).tocsc() for vec in vectorizers]
    df = np.concatenate([np.diff(c.indptr) for c in counts]).astype(np.float64)
    idf = np.where(df > 0, np.log((1 + len(texts)) / (1 + df)) + 1.0, 0.0).astype(np.float32)
    # Fitted on the columns the texts use (TF-IDF's vocabulary, in effect): lbfgs over all 2**18
    # hashed columns took 4.5 s on 400 rows, the unseen ones staying at zero anyway.
    seen = np.flatnonzero(df > 0)
    x = _features(vectorizers, config, idf, texts)[:, seen]
    clf = LogisticRegression(C=config.c, max_iter=3000)
    clf.fit(x, labels)
    coef = np.zeros((len(all_labels), 2 * n), np.float32)
    intercept = np.full(len(all_labels), _ABSENT_INTERCEPT, np.float32)
    rows = [index[c] for c in clf.classes_]
    if len(rows) == 2:  # binary: p1 = sigmoid(w.x + b) = softmax([0, w.x + b])
        intercept[rows[0]] = 0.0
        coef[rows[1], seen], intercept[rows[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        coef[np.ix_(np.asarray(rows), seen)], intercept[rows] = clf.coef_, clf.intercept_
    config.num_examples = len(texts)
    return LinearModel(config, coef, intercept, idf)


# ---- the artifact ---------------------------------------------------------------------------------
def save_linear(adapter_dir: Path, model: LinearModel) -> None:
    """Arrays to ``linear_model.safetensors``, settings to ``linear_config.json``; each file written
    to a temporary name and renamed, the config last (a reader sees both or neither new)."""
    from safetensors.numpy import save_file

    adapter_dir = Path(adapter_dir)
    tmp = adapter_dir / f".{LINEAR_WEIGHTS}.tmp"
    save_file(
        {
            "coef": np.ascontiguousarray(model.coef, dtype=np.float32),
            "intercept": np.ascontiguousarray(model.intercept, dtype=np.float32),
            "idf": np.ascontiguousarray(model.idf, dtype=np.float32),
        },
        str(tmp),
    )
    os.replace(tmp, adapter_dir / LINEAR_WEIGHTS)
    _write_json(adapter_dir / LINEAR_CONFIG, asdict(model.config))


def read_linear(adapter_dir: Path, labels: list[str]) -> LinearModel | None:
    """The adapter directory's linear model, checked against the bundle's ``labels``; None when the
    directory has none. Rows are put in the bundle's label order. Raise ``LinearModelError``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / LINEAR_CONFIG, adapter_dir / LINEAR_WEIGHTS
    if not cfg_path.exists() and not weights.exists():
        return None
    for p in (cfg_path, weights):
        if not p.exists():
            raise LinearModelError(f"{p.name} is missing in {adapter_dir}")
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LinearModelError(f"{LINEAR_CONFIG}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LinearModelError(f"{LINEAR_CONFIG}: expected a JSON object")
    config = LinearConfig.from_json(data)
    if set(config.labels) != set(labels):
        raise LinearModelError(
            f"linear model labels {sorted(config.labels)} are not the bundle's {sorted(labels)}"
        )
    size = weights.stat().st_size
    if size > MAX_LINEAR_BYTES:
        raise LinearModelError(f"{LINEAR_WEIGHTS}: {size} bytes exceeds the {MAX_LINEAR_BYTES} byte limit")
    try:
        arrays = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LinearModelError(f"{LINEAR_WEIGHTS}: unreadable safetensors file ({e})") from e
    if set(arrays) != {"coef", "intercept", "idf"}:
        raise LinearModelError(f"{LINEAR_WEIGHTS}: tensors {sorted(arrays)}, expected coef, intercept, idf")
    n_labels, n = len(config.labels), 2 * config.n_features
    expected = {"coef": (n_labels, n), "intercept": (n_labels,), "idf": (n,)}
    for name, shape in expected.items():
        a = arrays[name]
        if a.dtype != np.float32:
            raise LinearModelError(f"{LINEAR_WEIGHTS}: {name} dtype {a.dtype}, expected float32")
        if a.shape != shape:
            raise LinearModelError(f"{LINEAR_WEIGHTS}: {name} shape {a.shape}, expected {shape}")
        if not np.isfinite(a).all():
            raise LinearModelError(f"{LINEAR_WEIGHTS}: {name} contains NaN or Inf")
    order = [config.labels.index(lab) for lab in labels]
    config.labels = list(labels)
    return LinearModel(config, arrays["coef"][order], arrays["intercept"][order], arrays["idf"])


def read_serving(adapter_dir: Path) -> str:
    """What the gate chose to serve from this directory; ``transformer`` when it chose nothing."""
    path = Path(adapter_dir) / SERVING
    if not path.exists():
        return "transformer"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LinearModelError(f"{SERVING}: not valid JSON ({e})") from e
    model = data.get("model") if isinstance(data, dict) else None
    if model not in MODELS:
        raise LinearModelError(f"{SERVING}: model {model!r}, expected one of {list(MODELS)}")
    return str(model)


def write_serving(adapter_dir: Path, model: str, reasons: list[str] | None = None) -> None:
    if model not in MODELS:
        raise ValueError(f"model {model!r}, expected one of {list(MODELS)}")
    _write_json(Path(adapter_dir) / SERVING, {"model": model, "reasons": list(reasons or [])})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)
