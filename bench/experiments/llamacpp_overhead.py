"""Does the llamacpp backend add anything to llama.cpp's own speed?

The same GGUF artifact timed two ways, alternately, in fresh processes on the same cores:

* **through the product path**: `devices.measure` (a measurement child, the backend's
  `LlamaCppRunner`, the protocol's warm-up, calibration and sampling), as a search measures;
* **llama.cpp alone**: a bare loop over llama-cpp-python's ctypes calls the way llama-bench
  times them (`llama_decode` of the prompt from an empty memory for pp; for tg at depth d, an
  untimed prefill of d tokens, then n timed one-token `llama_decode`s), the same load and
  context settings (read into memory, n_batch 2048, n_ubatch 512, f16 K/V, flash attention
  auto), no Runner, no numpy copy of the logits, no protocol.

The issue's goal: the backend's prefill and decode within 5% of llama.cpp alone. Each round
runs both, the order swapped every round so that drift does not favour one side; the
ratio (backend / alone, of median milliseconds) is reported per round and as the median of
the rounds.

    python -m bench.experiments.llamacpp_overhead            # LFM2-350M q4_0, pp512 and tg16 @ d512, 3 rounds
    python -m bench.experiments.llamacpp_overhead --quick    # the tiny LFM2, short prompt
"""

from __future__ import annotations

import statistics

from bench.harness import BenchRun, _in_fresh_process, base_parser, compile_and_measure, log, measured_ms, precompile
from bench.models import MODELS, QUICK_POINT, quick_models
from bench.report import markdown_table

NAME = "llamacpp_overhead"


def parse_args(argv=None):
    parser = base_parser(NAME, __doc__.split("\n\n")[0], package=__package__)
    parser.add_argument("--model", default="LFM2-350M", choices=sorted(MODELS), help="the model (default LFM2-350M)")
    parser.add_argument("--quant", default="q4_0", help="GGUF precision (default q4_0)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--depth", type=int, default=512, help="decode depth (default 512)")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (default 16, llama-bench's tg16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (backend, alone) in alternating order (default 3)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per point of llama.cpp alone (default 10)")
    return parser.parse_args(argv)


def _alone_worker(gguf: str, max_context: int, vocab: int, threads: int, cpus: list[int], prefill: int, depth: int, tokens: int, reps: int) -> dict:
    """llama.cpp alone, in a fresh process: median ms of pp`prefill` and of one tg token at `depth`."""
    import ctypes
    import os
    import time

    import numpy as np

    os.sched_setaffinity(0, cpus)
    import llama_cpp

    quiet = llama_cpp.llama_log_callback(lambda *_: None)  # kept referenced: llama.cpp calls it later
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), model_params)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = max_context, 2048, 512, 1
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_F16
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    ids = np.random.default_rng(0).integers(0, vocab, size=max(prefill, depth) + tokens, dtype=np.int32)

    def feed(chunk: np.ndarray) -> None:
        for start in range(0, chunk.size, 2048):
            part = np.ascontiguousarray(chunk[start : start + 2048])
            status = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(part.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)), part.size))
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")

    def pp() -> float:
        llama_cpp.llama_memory_clear(memory, True)
        start = time.perf_counter_ns()
        feed(ids[:prefill])
        return (time.perf_counter_ns() - start) / 1e6

    def tg() -> float:
        llama_cpp.llama_memory_clear(memory, True)
        feed(ids[:depth])  # untimed: the context at depth, as llama-bench's -d
        start = time.perf_counter_ns()
        for i in range(tokens):
            feed(ids[depth + i : depth + i + 1])
        return (time.perf_counter_ns() - start) / 1e6 / tokens

    pp(), tg()  # warm-up, as llama-bench's default
    prefill_ms = sorted(pp() for _ in range(reps))
    decode_ms = sorted(tg() for _ in range(reps))
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"ok": True, "prefill_ms": statistics.median(prefill_ms), "decode_ms": statistics.median(decode_ms), "prefill_samples": prefill_ms, "decode_samples": decode_ms}


def main(argv=None) -> int:
    import os

    from devices.protocol import Protocol

    args = parse_args(argv)
    run = BenchRun(NAME, "llama.cpp through the backend against llama.cpp alone", args, package=__package__)
    if args.quick:
        spec, prefill, depth, tokens, rounds, reps = quick_models()["tiny-LFM2"], QUICK_POINT, QUICK_POINT, 4, 1, 3
    else:
        spec, prefill, depth, tokens, rounds, reps = MODELS[args.model], args.prefill, args.depth, args.tokens, args.rounds, args.reps
    protocol = Protocol(prompt_lengths=(prefill,), decode_depths=(depth,), decode_tokens=tokens, measure_memory=False, threads=args.threads)
    (compiled,) = precompile([(spec, "llamacpp", args.quant)], protocol, cache_dir=args.cache_dir, verify=True)
    if not compiled.get("ok"):
        raise SystemExit(f"compiling {spec.layout} for llamacpp {args.quant} failed: {compiled.get('error')}")
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]

    rounds_out = []
    for number in range(rounds):
        row: dict = {}
        for side in (("backend", "alone") if number % 2 == 0 else ("alone", "backend")):
            log(f"[{NAME}] round {number + 1}/{rounds}: {side}")
            if side == "backend":
                result = compile_and_measure(spec, "llamacpp", args.quant, protocol, cache_dir=args.cache_dir, threads=args.threads, precompiled=compiled)
                if not result["ok"]:
                    raise SystemExit(f"the backend's measurement failed: {result.get('error')}")
                row["backend"] = {"prefill_ms": measured_ms(result, "prefill", prefill), "decode_ms": measured_ms(result, "decode", depth)}
                artifact = result["artifact"]
            else:
                from devices.artifact import Artifact

                art = Artifact.load(compiled["path"], verify=False)
                row["alone"] = _in_fresh_process(_alone_worker, str(art.file(art.manifest["llamacpp"]["gguf"])), art.max_context, spec.vocab_size, args.threads, cpus, prefill, depth, tokens, reps, died="llama.cpp alone died")
        if not row["alone"].get("ok"):
            raise SystemExit(f"llama.cpp alone failed: {row['alone'].get('error')}")
        row["ratio_prefill"] = row["backend"]["prefill_ms"] / row["alone"]["prefill_ms"]
        row["ratio_decode"] = row["backend"]["decode_ms"] / row["alone"]["decode_ms"]
        rounds_out.append(row)

    summary = {kind: statistics.median(r[f"ratio_{kind}"] for r in rounds_out) for kind in ("prefill", "decode")}
    run.save({"model": args.model if not args.quick else "tiny-LFM2", "quant": args.quant, "prefill": prefill, "depth": depth, "tokens": tokens, "threads": args.threads, "rounds": rounds_out, "median_ratio": summary, "artifact": artifact})
    run.finish(render(rounds_out, summary, args, prefill, depth, tokens), "python -m bench.experiments.llamacpp_overhead" + (" --quick" if args.quick else ""))
    return 0


def render(rounds: list[dict], summary: dict, args, prefill: int, depth: int, tokens: int) -> str:
    rows = []
    for number, r in enumerate(rounds, 1):
        b, a = r["backend"], r["alone"]
        rows.append([number, f"{b['prefill_ms']:.1f}", f"{a['prefill_ms']:.1f}", f"{r['ratio_prefill']:.3f}", f"{b['decode_ms']:.2f}", f"{a['decode_ms']:.2f}", f"{r['ratio_decode']:.3f}"])
    verdict = ", ".join(f"{kind} {summary[kind]:.3f} ({'within' if abs(summary[kind] - 1) <= 0.05 else 'outside'} 5%)" for kind in ("prefill", "decode"))
    how = (
        f"How: {'the tiny LFM2' if args.quick else args.model} {args.quant}, {args.threads} threads on the same cores, pp{prefill} and tg{tokens} at depth {depth}, "
        f"{len(rounds)} round(s), each measuring through the product path (`devices.measure`: a fresh child, the backend's runner, the protocol's sampling) "
        "and llama.cpp alone (a fresh process of bare llama-cpp-python ctypes calls timed like llama-bench: one warm-up, then "
        f"{args.reps if not args.quick else 3} repetitions, medians), the order swapped every round. Ratio = backend ms / alone ms (1.000 = no overhead). "
        f"Median ratio over rounds: {verdict}."
    )
    return how + "\n\n" + markdown_table(["round", "pp backend ms", "pp alone ms", "pp ratio", "tg backend ms/token", "tg alone ms/token", "tg ratio"], rows)


if __name__ == "__main__":
    raise SystemExit(main())
