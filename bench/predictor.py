"""Predictor accuracy: `nas.predictor` fitted on measured architectures, each held out in turn.

The search can only skip compiling and measuring a candidate if something predicts its
latency and footprint well enough. This fits the predictor (non-negative linear models on
the cost model's FLOPs, bytes and memory estimate; see `nas.predictor`) on the
architectures `bench.repeatability` measured (its results file; the mean of its two
passes), and reports the leave-one-out relative error of each objective: every
architecture predicted by a model fitted without it, so these are held-out errors.

    python -m bench.predictor          # reuse bench/results/repeatability.json
    python -m bench.predictor --quick  # the quick repeatability run's results (needs at least 6 architectures: says so otherwise)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import BenchRun, base_parser, log
from bench.report import RESULTS_DIR, load_json, markdown_table, pct
from lfm2.errors import UserError
from lfm2.spec import ArchSpec

NAME = "predictor"


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, default=None, help="a bench.repeatability results file (default bench/results/repeatability.json; with --quick, the quick run's)")
    parser.add_argument("--raw", action="store_true",
                        help="fit the measured milliseconds even where the file is anchored (default for an anchored file: the ratios times the anchor's reference, as a search stores them)")
    return parser.parse_args(argv)


def observations_from_repeatability(data: dict):
    from nas.predictor import Observation

    def mean(values):
        values = [v for v in values if v]
        return sum(values) / len(values) if values else None

    return [Observation(ArchSpec.from_dict(r["spec"]), mean(r["prefill_ms"]), mean(r["decode_ms"]), mean(r["footprint_bytes"])) for r in data["rows"]]


def anchor_reference(data: dict) -> dict[str, float] | None:
    """An anchored run's reference, as a search takes it: the anchor's own milliseconds in the
    first measurement of pass 1 that has them (None: the file is not anchored)."""
    if not data.get("anchor"):
        return None
    points = {"prefill": data["prefill_tokens"], "decode": data["decode_depth"]}
    for result in data["raw"][0]:
        measured = result.get("measurement") or {}
        anchors = {kind: ((measured.get(kind) or {}).get(str(point)) or {}).get("anchor") for kind, point in points.items()}
        if all(anchors.values()):
            return {kind: float(anchor["anchor_quantile_ms"]) for kind, anchor in anchors.items() if anchor}
    return None


def anchored_observations(data: dict, reference: dict[str, float]):
    """The observations a search stores for an anchored study: each pass's ratio to the anchor
    times the reference, the two passes' mean (the footprint as measured)."""
    from nas.predictor import Observation

    def mean(values, scale=1.0):
        values = [v * scale for v in values if v]
        return sum(values) / len(values) if values else None

    return [
        Observation(ArchSpec.from_dict(r["spec"]), mean(r["prefill_anchor_ratio"], reference["prefill"]), mean(r["decode_anchor_ratio"], reference["decode"]), mean(r["footprint_bytes"]))
        for r in data["rows"]
    ]


def main(argv=None) -> int:
    from nas.predictor import Predictor

    args = parse_args(argv)
    run = BenchRun(NAME, "Predictor: held-out error of the latency and memory predictor", args)
    source = args.source or (Path(tempfile.gettempdir()) / "lfm2-nas-bench-repeatability-quick.json" if args.quick else RESULTS_DIR / "repeatability.json")
    if not source.is_file():
        log(f"[{NAME}] {source} does not exist: run `python -m bench.repeatability{' --quick' if args.quick else ''}` first")
        return 2
    data = load_json(source)
    protocol = data["protocol"]
    context = max(max(protocol["prompt_lengths"]), max(protocol["decode_depths"]) + protocol["decode_tokens"])
    reference = None if args.raw else anchor_reference(data)
    observations = observations_from_repeatability(data) if reference is None else anchored_observations(data, reference)
    try:
        predictor = Predictor.fit(observations, prompt_tokens=data["prefill_tokens"], decode_depth=data["decode_depth"], backend=data["backend"], quant=data["quant"], context=context)
    except UserError as exc:
        log(f"[{NAME}] {exc}")
        run.finish(f"Not enough measured architectures in `{source.name}` to fit the predictor: {exc}", "python -m bench.predictor" + (" --quick" if args.quick else ""))
        return 0
    described = predictor.describe()
    run.save({"source": str(source), "backend": data["backend"], "quant": data["quant"], "predictor": described, "data_date": data.get("date"), "anchor_reference": reference})
    command = "python -m bench.predictor" + (" --quick" if args.quick else "") + (f" --from {args.source}" if args.source else "") + (" --raw" if args.raw else "")
    run.finish(render(described, source, data, reference), command)
    return 0


def render(described: dict, source: Path, data: dict, reference: dict[str, float] | None = None) -> str:
    what = (
        "the mean of the two passes"
        if reference is None
        else f"anchored latencies as a search stores them: each pass's ratio to the anchor times the anchor's reference ({reference['prefill']:.3g} ms prefill, {reference['decode']:.3g} ms decode), the mean of the two passes"
    )
    how = (
        f"How: `nas.predictor.Predictor` fitted on the {len(data['rows'])} architectures of `{source.name}` ({data['backend']} {data['quant']}, "
        f"prefill {data['prefill_tokens']} tokens, decode at depth {data['decode_depth']}, measured {data.get('date', '?')}; {what}). "
        "Leave-one-out: each architecture is predicted by the model fitted on the others; error = (predicted - measured) / measured. "
        "The measurements' own run-to-run spread (bench.repeatability, same data) is the floor a predictor cannot beat."
    )
    rows = []
    for target, model in described["models"].items():
        a = model["leave_one_out"]
        coefficients = ", ".join(f"{name} {value:.3g}" for name, value in model["coefficients"].items())
        rows.append([target, a["n"], pct(a["within_10pct"]), pct(a["within_25pct"]), pct(a["median_abs_error"], 1), pct(a["max_abs_error"], 1), coefficients])
    table = markdown_table(["objective", "architectures", "within ±10%", "within ±25%", "median abs error", "max abs error", "fitted coefficients (ms per unit; the footprint: x the estimate + MiB)"], rows)
    return "\n\n".join([how, table])


if __name__ == "__main__":
    raise SystemExit(main())
