"""A tabular benchmark: every architecture of a small, fully enumerable space measured once.

Comparing samplers on live measurements costs hours per search on this machine, and eight
trials cannot tell NSGA-II from random (BENCHMARKS.md, search efficiency). NAS-Bench-style,
this measures every architecture of a space once and keeps the table as data
(`bench/results/tabular/table.json`, with the stack and device fingerprint); searches are
then replayed against the table offline in seconds (`bench.tabular_replay`), as often as
statistics need.

The space (`TABLE_SPACE`, the same file format and trial encoding as the search's spaces,
so a replay samples exactly as `lfm2-nas search` does) is the small space cut down to what
can be enumerated: width 384, depth 4-6, and per layer slot a gated convolution or full
attention: 2^4 + 2^5 + 2^6 = 112 architectures. (Widths 384 and 640, 224 architectures, were
planned; at a load average of 20 on this 2-core machine a measurement took 20-30 s, and the
second width did not fit the time this benchmark had.)

Each one is measured by the project's own protocol (`devices.measure`: a fresh process,
warm-up until steady, timed runs until the median's interval is tight, peak memory in its
own pass) on the eager backend at prefill 256 and decode at depth 256 with one thread on
one pinned core. Why eager: an ONNX or ExecuTorch compile per architecture would make the
table take hours on this shared 2-core machine (a compile per architecture), while an eager "compile" is
a config file; eager prefill is real GEMM work of the real model, and eager decode is
bound by Python overhead per layer (it follows depth and layer types, not bytes read), so
the table is a real device/stack, just not the deployed one. The replay's conclusions are
about samplers and pre-screening on a real measured landscape.

As the search measures by default, each architecture is timed beside the table space's
anchor (`SearchSpace.anchor_spec`, compiled for eager too): the rows keep the raw medians
and each point's ratio of lower quartiles to the anchor, which the replay ranks by (times
the anchor's median quartile over the table), so that the host's drift during the run is
not part of the landscape. `--no-anchor` measures the plain medians (the 2026-12-01 table).

    python -m bench.tabular                      # all 112, anchored (16 minutes on an idle VM; plain, 33 at a load average of ~20)
    python -m bench.tabular --quick              # 6 architectures, to a temporary file
    python -m bench.tabular --resume             # measure only what the table lacks
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import base_parser, log
from bench.report import RESULTS_DIR, load_average, machine_facts

NAME = "tabular"
TABLE_PATH = RESULTS_DIR / "tabular" / "table.json"

#: The enumerable space of the table (a space file, as `lfm2-nas search --space FILE` takes).
TABLE_SPACE = """
name = "tabular"
description = "The tabular benchmark's space: the small space cut to 112 enumerable architectures"
vocab_size = 8192
max_seq_len = 4096
head_dim = 64
ffn_multiple_of = 256
d_model = 384
n_layers = { min = 4, max = 6, step = 1 }
ffn_multiplier = 3.0
n_kv_heads = 2
conv_kernel = 3
operators = ["conv", "attn"]
"""

PROMPT_TOKENS = 256
DECODE_DEPTH = 256
DECODE_TOKENS = 8


def table_space():
    from search_space import SearchSpace

    return SearchSpace.from_text(TABLE_SPACE, origin="bench.tabular.TABLE_SPACE")


def enumerate_specs() -> list:
    """Every architecture of TABLE_SPACE, in a fixed order (width, depth, layout)."""
    space = table_space()
    specs = []
    for d_model in space.values("d_model"):  # one value here; the loop keeps the table's space free to grow
        for depth in space.values("n_layers"):
            for layout in itertools.product(space.values("operators"), repeat=depth):
                params = {"d_model": d_model, "n_layers": depth}
                for slot in range(space.max_depth):
                    params[space.slot_name(slot)] = layout[slot] if slot < depth else space.values("operators")[0]
                specs.append(space.spec_from_params({k: v for k, v in params.items() if k in space.distributions()}))
    keys = {spec.key for spec in specs}
    assert len(keys) == len(specs), "the enumeration gave one architecture twice"
    return specs


def protocol(anchored: bool = False):
    from devices.protocol import Protocol

    # The protocol's sampling, with a tighter time cap per point (1 s; 2 s when every sample
    # is a pair with the anchor) and at most 3 warm-up runs, so that the table fits in well
    # under an hour.
    return Protocol(prompt_lengths=(PROMPT_TOKENS,), decode_depths=(DECODE_DEPTH,), decode_tokens=DECODE_TOKENS, max_seconds_per_point=2.0 if anchored else 1.0,
                    max_warmup_runs=3, max_runs=30, max_remeasures=0, measure_memory=True, threads=1)


def compile_eager(spec, proto, cache_dir: Path):
    from devices.compile import compile as compile_artifact

    return compile_artifact(spec, "eager", "fp32", proto.max_context, proto.prompt_lengths, cache_dir=cache_dir, verify=False)


def measure_one(spec, proto, cpu: int, cache_dir: Path, anchor=None) -> dict:
    """One architecture's row; with `anchor` (the table space's anchor, compiled), measured
    as an anchored search measures: every sample a pair with the anchor, and the row also
    holds each point's ratio of lower quartiles (`prefill_anchor_ratio`, ...)."""
    from devices.measure import measure
    from devices.protocol import Limits, Measurement

    started = time.perf_counter()
    artifact = compile_eager(spec, proto, cache_dir)
    m: Measurement = measure(artifact, proto, Limits(cpus=(cpu,), threads=1, timeout_s=600), anchor=anchor)
    row = {"key": spec.key, "layout": spec.layout, "spec": spec.to_dict(), "status": m.status, "error": m.error, "wall_s": round(time.perf_counter() - started, 2)}
    if m.ok:
        prefill, decode = m.prefill[PROMPT_TOKENS], m.decode[DECODE_DEPTH]
        row.update(
            prefill_ms=prefill.median_ms,
            decode_ms=decode.median_ms,
            prefill_ci_rel=prefill.ci_half_width_rel,
            decode_ci_rel=decode.ci_half_width_rel,
            prefill_disturbed=prefill.disturbed,
            decode_disturbed=decode.disturbed,
            footprint_bytes=m.memory.get("footprint_bytes"),
            peak_rss_bytes=m.memory.get("peak_rss_bytes"),
            device_fingerprint=(m.device or {}).get("fingerprint"),
        )
        for name, stats in (("prefill", prefill), ("decode", decode)):
            if stats.anchor is not None:
                row[f"{name}_anchor_ratio"] = stats.anchor["ratio"]
                row[f"{name}_anchor_ratio_ci_rel"] = stats.anchor_ratio_half_width_rel
                row[f"{name}_anchor_quantile_ms"] = stats.anchor["anchor_quantile_ms"]
        row["stack"] = m.stack
    return row


def load_table(path: Path = TABLE_PATH) -> dict:
    return json.loads(Path(path).read_text())


def main(argv=None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="keep the rows the table has and measure the rest")
    parser.add_argument("--no-anchor", dest="anchor", action="store_false", help="measure the plain medians, without the table space's anchor timed beside each architecture")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the core measurements are pinned to (default: the last usable one)")
    args = parser.parse_args(argv)
    specs = enumerate_specs()
    path = args.results or (Path(tempfile.gettempdir()) / "lfm2-nas-bench-tabular-quick.json" if args.quick else TABLE_PATH)
    if args.quick:
        specs = specs[:: len(specs) // 6][:6]
    rows: dict[str, dict] = {}
    data_started = None
    if args.resume and path.is_file():
        previous = load_table(path)
        if bool(previous.get("anchor")) != args.anchor:
            raise SystemExit(f"{path} was measured {'with' if previous.get('anchor') else 'without'} the anchor; resume it "
                             f"{'without --no-anchor' if previous.get('anchor') else 'with --no-anchor'}, or measure a new table (--results FILE)")
        rows = {r["key"]: r for r in previous["rows"] if r.get("status") == "ok"}
        data_started = previous.get("started")
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="lfm2-nas-tabular-"))
    proto = protocol(anchored=args.anchor)
    anchor_spec = table_space().anchor_spec() if args.anchor else None
    anchor = compile_eager(anchor_spec, proto, cache_dir) if anchor_spec is not None else None
    data = {
        "benchmark": NAME,
        "space": TABLE_SPACE.strip(),
        "protocol": proto.to_dict(),
        "backend": "eager",
        "quant": "fp32",
        "machine": machine_facts(),
        "load_before": load_average(),
        "nice": os.nice(0),
        "started": data_started or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "architectures": len(specs),
        "anchor": anchor_spec.to_dict() if anchor_spec is not None else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # A seeded shuffled order: the machine's load drifts during the run (other engineers'
    # jobs), and measuring in enumeration order would turn that drift into a bias by width
    # and depth; shuffled, it is noise spread over the table.
    order = np.random.default_rng(0).permutation(len(specs))
    for done, index in enumerate(order):
        spec = specs[index]
        if spec.key in rows:
            continue
        row = measure_one(spec, proto, args.cpu, cache_dir, anchor)
        row["load_1min"] = load_average()[0]
        rows[spec.key] = row
        log(f"[{NAME}] {done + 1}/{len(specs)} {spec.layout} d={spec.d_model}: {row['status']} prefill {row.get('prefill_ms', 0):.1f} ms decode {row.get('decode_ms', 0):.2f} ms "
            f"footprint {(row.get('footprint_bytes') or 0) / 2**20:.0f} MiB ({row['wall_s']:.1f} s)")
        if done % 5 == 0:  # keep what is measured if the run stops
            _write(path, data, rows, specs)
    data["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["load_after"] = load_average()
    _write(path, data, rows, specs)
    log(f"[{NAME}] wrote {path}: {sum(r['status'] == 'ok' for r in rows.values())} of {len(specs)} measured")
    return 0


def _write(path: Path, data: dict, rows: dict, specs: list) -> None:
    ordered = [rows[s.key] for s in specs if s.key in rows]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, "rows": ordered}, indent=1, sort_keys=False))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
