"""How the token dimension shapes ExecuTorch's XNNPACK lowering: the `forward` method of one
small-space candidate (8da4w) exported with the dynamic token dimension the backend ships,
and with static 128-token and 1-token inputs; prints export and lowering seconds, the number
of XNNPACK partitions and the nodes left outside them (BENCHMARKS.md, search economics).

    python -m bench.experiments.executorch_partitions dynamic 128 1
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", help="'dynamic' or a static token count")
    parser.add_argument("--context", type=int, default=528)
    args = parser.parse_args()

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from bench.models import sample_space
    from devices.backends import executorch as backend
    from devices.backends.executorch_model import ExecuTorchLFM2
    from lfm2.model import build_model

    torch.set_num_threads(1)
    backend._load_toolchain()  # export needs the custom ops and the 4-bit embedding definition
    spec = sample_space(1, seed=0)[0]
    model = build_model(spec, seed=0).eval()
    backend.quantize_8da4w(model)
    embedding = backend.embedding_table(model)
    for shape in args.shapes:
        start = time.perf_counter()
        wrapper = ExecuTorchLFM2(model, args.context, "forward", embedding)
        with torch.no_grad():
            if shape == "dynamic":
                tokens = torch.export.Dim.DYNAMIC(min=1, max=backend.PREFILL_CHUNK)
                example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
                program = torch.export.export(wrapper, example, dynamic_shapes=({1: tokens}, None), strict=False)
            else:
                example = (torch.zeros(1, int(shape), dtype=torch.long), torch.tensor([0]))
                program = torch.export.export(wrapper, example, strict=False)
        exported = time.perf_counter()
        edge = to_edge_transform_and_lower({"forward": program}, partitioner={"forward": [XnnpackPartitioner()]}, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        lowered = time.perf_counter()
        facts = backend._graph_facts(edge, ["forward"])
        outside = facts["not_delegated_by_method"]["forward"]
        print(f"{spec.layout} {shape}: export {exported - start:.1f} s, lowering {lowered - exported:.1f} s, "
              f"partitions {facts['partitions']['forward']}, nodes outside delegates {sum(outside.values())}", flush=True)
        print(f"    outside: {outside}", flush=True)


if __name__ == "__main__":
    main()
