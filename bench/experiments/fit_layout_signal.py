"""Fit the search's default quality signal (`nas/quality/layout.py`) on a fidelity run's references.

The `layout` signal is a ridge regression of the five free features (attention layers, any
attention, attention share, depth, log proxy parameters) onto minus the references'
validation bits per byte. This fits it on every architecture of a fidelity run (its ridge
strength chosen by leave-one-out, as `bench/experiments/fidelity_signals.py` does for the held-out
judgement), and writes `nas/quality/layout_signal.json` with the coefficients, a version,
what it was fitted on, and the fidelity that run measured for it held out (so the numbers
printed by `lfm2-nas quality --help` are the benchmark's, not the fit's own).

    python -m bench.experiments.fit_layout_signal --run bench/results/fidelity_signals23 --version 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.experiments import fidelity_signals
from bench.experiments.quality_fidelity import architectures
from nas.quality import layout

FREE_COMBINATION = "learned combination, held out: free features (layout, parameters)"


def fit(run: Path, version: int) -> dict:
    facts = json.loads((run / "facts.json").read_text())
    rows = [json.loads(line) for line in (run / "fidelity.jsonl").read_text().splitlines() if line.strip()]
    references = {r["arch"]: r for r in rows if r.get("ok") and r["stage"] == "long" and r.get("seed", 0) == 0}
    specs = dict(architectures(int(facts["archs"]), int(facts.get("arch_seed", 0))))
    names = sorted(a for a in references if a in specs)
    for name in names:  # the rows must be of these very architectures, and the features the benchmark's
        if references[name]["spec_key"] != specs[name].key:
            raise SystemExit(f"{run}: {name}'s reference was trained for another spec ({references[name]['spec_key']} != {specs[name].key})")
        if layout.proxy_parameters(specs[name]) != references[name]["proxy_parameters"]:
            raise SystemExit(f"{name}: proxy parameters {layout.proxy_parameters(specs[name])} here, {references[name]['proxy_parameters']} in the run")
    x = np.array([layout.features(specs[a]) for a in names])
    y = np.array([-references[a]["bpb"] for a in names])
    alpha = min(fidelity_signals.RIDGE_ALPHAS, key=lambda a: fidelity_signals._loo_errors(x, y, a))
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))

    # the fidelity the run measured, held out (bench/fidelity_signals.evaluate)
    layouts = {a: references[a]["layout"] for a in names}
    params = {a: float(references[a]["proxy_parameters"]) for a in names}
    judged = fidelity_signals.evaluate(rows, {a: references[a]["bpb"] for a in names}, layouts, params)["signals"]

    def brief(entry: dict) -> dict:
        return {k: entry.get(k) for k in ("n", "spearman", "ci95", "n_hybrids", "spearman_hybrids", "ci95_hybrids")}

    data = {
        "version": version,
        "features": list(layout.FEATURES),
        "mean": mean.tolist(), "scale": scale.tolist(), "weights": weights.tolist(), "intercept": float(y.mean()), "ridge_alpha": alpha,
        "target": "minus the validation bits per byte of a proxy-width byte-level model trained on 20x the MAD proxy's tokens",
        "fitted_on": {"run": run.name, "architectures": len(names), "reference_tokens": facts["reference_tokens"],
                      "reference_corpus": facts["reference_corpus"], "corpus_fingerprint": references[names[0]].get("corpus"),
                      "settings_key": facts["settings_key"]},
        "fidelity_held_out": brief(judged[FREE_COMBINATION]),
        "fidelity_attention_count": brief(judged["number of attention layers"]),
        "gpu_seconds_per_candidate": 0,
    }
    data["signal_version"] = f"layout-v{version}-{layout.coefficients_hash(data)}"
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.fit_layout_signal", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="bench/results/fidelity_signals23", help="a fidelity run's --out (facts.json, fidelity.jsonl)")
    parser.add_argument("--version", type=int, required=True, help="the fit's version number (bump it with every refit)")
    parser.add_argument("--out", default=str(layout.SIGNAL_FILE))
    args = parser.parse_args(argv)
    data = fit(Path(args.run), args.version)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: data[k] for k in ("signal_version", "weights", "ridge_alpha", "fidelity_held_out", "fidelity_attention_count")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
