"""One-off experiments: scripts run once (or a few times) to answer one question, whose
answer is in BENCHMARKS.md with the command that produced it. Unlike the benchmarks in
bench/, CI does not smoke-run them and nothing re-runs them to track a number over time;
several need a GPU, an optional backend or hours. They share bench's harness and report.

    python -m bench.experiments.adb_runner_vs_python  # lfm2-runner over (stand-in) adb vs llama-cpp-python
    python -m bench.experiments.executorch_recipe     # the project's ExecuTorch 8da4w vs ExecuTorch's LFM2 recipe
    python -m bench.experiments.llamacpp_overhead     # the llamacpp backend vs llama.cpp alone (the 5% goal)
    python -m bench.experiments.quality_fidelity      # do the quality proxies rank as a longer training does? (GPU)
    python -m bench.experiments.fit_layout_signal     # fits nas/quality/layout_signal.json on a fidelity run
    python -m bench.experiments.train_h200            # two ~350M architectures trained side by side (GPU)

`fidelity_signals` is imported, not run: the statistics with which quality_fidelity (and
fit_layout_signal) judge candidate quality signals.

Results stay in bench/results/ with the benchmarks' (see bench/README.md).
"""
