"""lfm2-runner (the native program the adb agent runs on a phone) against llama.cpp through
llama-cpp-python (the local llamacpp backend), measured the same way, side by side.

With no phone here, the runner runs on this host through the adb stand-in of the tests
(tests/testkit/adb.py: push = copy, shell = run here), pinned to the same core and with
the same thread count as the local measurement; both go through `devices.sampling`. Rounds
alternate the two (A B, then B A, ...), so a busy machine slows both alike; the ratio per
round is what to read, not the absolute times.

    python -m bench.experiments.adb_runner_vs_python            # d_model 512, prompt 256, depth 256, 3 rounds
    python -m bench.experiments.adb_runner_vs_python --quick    # the tiny model, 1 round
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.report import markdown_table
from devices.protocol import Limits, Protocol
from lfm2.spec import ArchSpec


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.adb_runner_vs_python", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--depth", type=int, default=256)
    parser.add_argument("--quant", default="q4_0")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from testkit.adb import StandinPhone  # the tests' stand-in: this host plays the phone

    from devices.adb.measure import Phone
    from devices.adb.runner_build import build_runner
    from devices.adb.transport import AdbTransport
    from devices.compile import compile
    from devices.measure import measure

    if args.quick:
        spec = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=128, conv_kernel=3)
        args.rounds, args.prompt, args.depth = 1, 32, 32
    else:
        spec = ArchSpec(vocab_size=8192, d_model=512, layers=("conv", "conv", "attn", "conv", "conv", "attn"), n_heads=8, n_kv_heads=4, ffn_dim=1536, conv_kernel=3)
    protocol = Protocol(prompt_lengths=(args.prompt,), decode_depths=(args.depth,), decode_tokens=16)
    work = Path(tempfile.mkdtemp(prefix="bench-adb-"))
    artifact = compile(spec, "llamacpp", args.quant, max(args.prompt, args.depth + 16), (args.prompt,), cache_dir=work / "cache")
    cpu = sorted(os.sched_getaffinity(0))[-1]
    phone = StandinPhone(work / "phone")
    (phone.root / "host_cpus").write_text(str(cpu))
    os.environ.update(phone.env())
    target = Phone.open(AdbTransport(phone.serial), build_runner())
    rows = []
    for round_ in range(1, args.rounds + 1):
        # the order swaps every round: whichever runs second must not always meet the same load
        if round_ % 2:
            local = measure(artifact, protocol, Limits(cpus=(cpu,), threads=1))
            runner = target.measure(artifact, protocol, Limits(cpus=(8,), threads=1))
        else:
            runner = target.measure(artifact, protocol, Limits(cpus=(8,), threads=1))
            local = measure(artifact, protocol, Limits(cpus=(cpu,), threads=1))
        assert local.ok and runner.ok, (local.error, runner.error)
        for point, a, b in (
            (f"prefill {args.prompt}", local.prefill[args.prompt], runner.prefill[args.prompt]),
            (f"decode @{args.depth}", local.decode[args.depth], runner.decode[args.depth]),
        ):
            rows.append([str(round_), point, f"{a.median_ms:.3f}", f"{b.median_ms:.3f}", f"{b.median_ms / a.median_ms:.3f}", f"+-{a.ci_half_width_rel:.1%} / +-{b.ci_half_width_rel:.1%}"])
        rows.append([str(round_), "footprint MiB", f"{local.memory['footprint_bytes'] / 2**20:.1f}", f"{runner.memory['footprint_bytes'] / 2**20:.1f}", "", ""])
    print(f"{spec.d_model=} layers={len(spec.layers)} vocab={spec.vocab_size} {args.quant}, one thread on core {cpu}")
    print(markdown_table(["round", "point", "llama-cpp-python ms", "lfm2-runner ms", "runner / python", "median CI (95%)"], rows))


if __name__ == "__main__":
    main()
