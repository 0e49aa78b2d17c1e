"""Compile throughput: seconds to compile one small-space candidate, by backend and stage.

What a search pays per candidate before the device sees it: `devices.compile.compile` as
the search calls it (`nas.workers.compile_candidate`: verification against eager on), each
compile in a fresh process with one torch thread (one compile per core, as the search
runs them) and an empty artifact cache. Reported per backend: wall time of the compile
call, the export's own stages (the manifest's `stages_s`: build, export, lower, quantise,
serialise, write...), and verification (wall minus export).

    nice -n 5 python -m bench.compile_throughput             # 2 architectures x 3 backends
    python -m bench.compile_throughput --quick               # 1 architecture, ONNX only
"""

from __future__ import annotations

import tempfile
import time

from bench.harness import BenchRun, _in_fresh_process, base_parser, log
from bench.models import sample_space
from bench.report import markdown_table

NAME = "compile_throughput"
BACKENDS = (("onnx", "fp32"), ("executorch", "8da4w"), ("llamacpp", "q4_0"))


def _compile_worker(spec_dict: dict, backend: str, quant: str, max_context: int, prompt_lengths: tuple[int, ...], cache_dir: str) -> dict:
    import torch

    from devices.compile import compile as compile_artifact
    from lfm2.spec import ArchSpec

    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        artifact = compile_artifact(ArchSpec.from_dict(spec_dict), backend, quant, max_context, prompt_lengths, cache_dir=cache_dir, verify=True)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000], "wall_s": time.perf_counter() - started}
    wall = time.perf_counter() - started
    manifest = artifact.manifest
    return {"ok": True, "wall_s": wall, "export_s": manifest.get("compile_s"), "stages_s": manifest.get("stages_s") or {},
            "verify_s": wall - (manifest.get("compile_s") or 0.0), "verified": bool((manifest.get("verification") or {}).get("passed")), "bytes": artifact.size_bytes}


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, default=2, help="small-space architectures per backend (default 2)")
    parser.add_argument("--context", type=int, default=128, help="prompt length and decode depth the artifact serves (default 128, the README's quick search)")
    parser.add_argument("--backends", default=",".join(f"{b}:{q}" for b, q in BACKENDS))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = BenchRun(NAME, "Compile throughput: seconds per small-space candidate, by backend and stage", args)
    specs = sample_space(1 if args.quick else args.archs, seed=0)
    backends = [tuple(item.split(":")) for item in ("onnx:fp32" if args.quick else args.backends).split(",")]
    max_context, lengths = args.context + 8, (args.context,)  # the search's decode_tokens = 8
    rows = []
    for backend, quant in backends:
        for spec in specs:
            cache = tempfile.mkdtemp(prefix="lfm2-nas-compile-bench-")
            log(f"[{NAME}] {backend} {quant}: {spec.layout} d={spec.d_model}")
            result = _in_fresh_process(_compile_worker, spec.to_dict(), backend, quant, max_context, lengths, cache, died="the compile process died (out of memory?)")
            result.update(backend=backend, quant=quant, layout=spec.layout, d_model=spec.d_model)
            log(f"[{NAME}]   {result.get('wall_s', 0):.1f} s {'ok' if result.get('ok') else result.get('error', '')[:200]} export {result.get('export_s')} stages {result.get('stages_s')}")
            rows.append(result)
    run.save({"context": args.context, "rows": rows})
    run.finish(render(rows, args), "nice -n 5 python -m bench.compile_throughput" + (" --quick" if args.quick else ""))
    return 0


def render(rows: list[dict], args) -> str:
    how = (f"How: `devices.compile.compile(..., verify=True)` as the search calls it, context {args.context} (max_context {args.context + 8}), "
           "each compile in a fresh process with one torch thread and an empty artifact cache, one at a time, small-space architectures "
           "drawn by `bench.models.sample_space(seed=0)`. export = the backend's own stages (manifest `stages_s`), verify = the check against eager.")
    table = []
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("stages_s") or {}).items())
        table.append([f"{r['backend']} {r['quant']}", f"{r['layout']} d={r['d_model']}", f"{r['wall_s']:.1f}" if r.get("ok") else "failed",
                      f"{r['export_s']:.1f}" if r.get("ok") else "-", f"{r['verify_s']:.1f}" if r.get("ok") else "-", stages or (r.get("error") or "")[:120]])
    return "\n\n".join([how, markdown_table(["backend", "architecture", "wall s", "export s", "verify s", "export stages (s)"], table)])


if __name__ == "__main__":
    raise SystemExit(main())
