"""The `layout` quality signal: a candidate's quality predicted from its layout alone, no training.

Why a free signal is the default: BENCHMARKS.md's fidelity runs trained every candidate
signal (the MAD proxy, a wider MAD proxy, LM proxies, best-of-seeds, learning speed,
learned combinations) and ranked 23 sampled architectures against references trained on
20x the proxies' tokens. None ranked them clearly better than counting attention layers,
which costs nothing. So the search's default signal is the cheapest one that matches the
free baselines: a ridge regression of five free features -- the number of attention
layers (full and sliding-window), whether there is any, their share of the layers, the
depth, and the log parameter count of the candidate's proxy -- fitted on those references
and shipped as data (`layout_signal.json`, written by `bench/experiments/fit_layout_signal.py`).

Its score is minus the predicted validation bits per byte of the proxy-width reference run
(higher is better, like every quality score). Held out architecture by architecture it
ranked the 23 at Spearman +0.85 (attention count alone: +0.81); the file carries those
numbers, the fit's version, and what it was fitted on. What it cannot do: tell two layouts
apart that differ only in where the attention layers sit, or in width at equal parameters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from lfm2.spec import ATTENTION_OPERATORS, ArchSpec

#: The fitted coefficients, their version and their measured fidelity (data, not code).
SIGNAL_FILE = Path(__file__).with_name("layout_signal.json")
#: The features, in the order of the coefficients (bench/experiments/fidelity_signals.py's free features).
FEATURES = ("attention layers", "any attention", "attention share", "layers", "log proxy parameters")


def attention_layers(spec: ArchSpec) -> int:
    """Full and sliding-window attention layers."""
    return sum(kind in ATTENTION_OPERATORS for kind in spec.layers)


def proxy_parameters(spec: ArchSpec) -> int:
    """Parameters of the candidate's byte-level proxy under `QualitySettings.default()`: the
    model the references were trained as (the proxy's parameters, not the candidate's, are
    what the fit saw). Counted on the meta device: nothing is allocated."""
    from lfm2.corpus import BYTE_VOCAB_SIZE
    from lfm2.model import build_model, count_parameters
    from nas.quality.proxy import proxy_spec
    from nas.quality.settings import QualitySettings

    s = QualitySettings.default()
    proxy = proxy_spec(spec, width_factor=s.width_factor, vocab_size=BYTE_VOCAB_SIZE, seq_len=s.lm_seq_len,
                       width_multiple=s.width_multiple, min_d_model=s.min_d_model, min_head_dim=s.min_head_dim)
    return count_parameters(build_model(proxy, device="meta"))


def features(spec: ArchSpec) -> list[float]:
    """The free features of `spec`, in `FEATURES` order."""
    n = attention_layers(spec)
    return [float(n), float(n > 0), n / len(spec.layers), float(len(spec.layers)), math.log(proxy_parameters(spec))]


@functools.lru_cache(maxsize=1)
def signal() -> dict[str, Any]:
    """The shipped fit: coefficients, version, what it was fitted on, its measured fidelity."""
    data = json.loads(SIGNAL_FILE.read_text())
    if tuple(data["features"]) != FEATURES:
        raise ValueError(f"{SIGNAL_FILE}: features {data['features']} are not {list(FEATURES)}; refit with `python -m bench.experiments.fit_layout_signal`")
    return data


def version() -> str:
    """Names the fit: `layout-v<N>-<first 8 hex digits of the coefficients' hash>`."""
    data = signal()
    return f"layout-v{data['version']}-{coefficients_hash(data)}"


def coefficients_hash(data: dict[str, Any]) -> str:
    numbers = {k: data[k] for k in ("features", "mean", "scale", "weights", "intercept")}
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:8]


def predict(values: list[float]) -> float:
    """The fitted ridge regression: minus the predicted reference bits per byte."""
    data = signal()
    z = [(v - m) / s for v, m, s in zip(values, data["mean"], data["scale"])]
    return float(sum(w * x for w, x in zip(data["weights"], z)) + data["intercept"])


def score_layout(spec: ArchSpec) -> dict[str, Any]:
    """`score(spec, "layout")`'s result fields: score and detail (no training, no device)."""
    started = time.perf_counter()
    values = features(spec)
    value = predict(values)
    data = signal()
    return {
        "score": value,
        "detail": {
            "kind": "layout",
            "spec_key": spec.key,
            "signal_version": version(),
            "features": dict(zip(FEATURES, values)),
            "predicted_reference_bpb": -value,
            "fitted_on": data["fitted_on"],
            "wall_s": time.perf_counter() - started,
            "device": "none (no training)",
        },
    }


__all__ = ["FEATURES", "SIGNAL_FILE", "attention_layers", "features", "predict", "proxy_parameters", "score_layout", "signal", "version"]
