"""Benchmarks: the numbers users judge lfm2-nas by. Each script measures side by side in one
run on this machine, prints a table and rewrites its own block of BENCHMARKS.md.

    python -m bench.lfm2_vs_attention    # LFM2 vs all-attention models: prefill/decode tok/s
    python -m bench.roofline             # bandwidth and GEMM ceilings; backends as a fraction
    python -m bench.repeatability        # the same 20 architectures measured twice
    python -m bench.memory_estimate      # analytic peak-memory estimate vs measured footprint
    python -m bench.search_efficiency    # NSGA-II vs random search: hypervolume, utilisation
    python -m bench.predictor            # nas.predictor's held-out accuracy on repeatability's data
    python -m bench.tabular              # every architecture of a small space measured once
    python -m bench.tabular_replay       # searches replayed offline against the tabular benchmark
    python -m bench.compile_throughput   # seconds to compile a candidate, by backend and stage

Every script takes `--quick` (a smoke run that writes no BENCHMARKS.md, which CI runs) and
`--no-write`. They measure; they never assert timings. One-off experiments, run to answer
one question rather than to track a number, are in `bench.experiments`; bench/README.md
lists both.
"""
