"""The machine's ceilings: memory read bandwidth and fp32 GEMM rate, at 1 and N threads.

Each is the best of several repetitions (a ceiling is what the machine can do, so the
fastest run is the estimate; the median is kept beside it to show the noise).

* Read bandwidth: summing a float32 array far larger than the last-level cache (256 MiB
  by default). numpy's sum is single-threaded; torch's uses `torch.set_num_threads`.
* GEMM: an n x n fp32 matmul (2 n^3 FLOPs) through torch (MKL/oneDNN), and numpy's BLAS
  at one thread (threadpoolctl limits it) as a cross-check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from bench.stats import median


def _time_best(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> tuple[float, float]:
    """(best, median) wall seconds of `fn` over `repeats` calls after one warm-up."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), median(times)


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_bandwidth_torch(threads: int, megabytes: int = 256, repeats: int = 7) -> dict:
    import torch

    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    with torch_threads(threads):
        best, med = _time_best(lambda: x.sum(), repeats)
    nbytes = x.numel() * 4
    return {"tool": "torch.sum", "threads": threads, "bytes": nbytes, "best_GBps": nbytes / best / 1e9, "median_GBps": nbytes / med / 1e9}


def read_bandwidth_numpy(megabytes: int = 256, repeats: int = 7) -> dict:
    import numpy as np

    x = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    best, med = _time_best(lambda: x.sum(), repeats)
    return {"tool": "numpy.sum", "threads": 1, "bytes": x.nbytes, "best_GBps": x.nbytes / best / 1e9, "median_GBps": x.nbytes / med / 1e9}


def gemm_rate_torch(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    import torch

    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    with torch_threads(threads):
        best, med = _time_best(lambda: torch.mm(a, b), repeats)
    flops = 2 * n**3
    return {"tool": "torch.mm fp32", "threads": threads, "n": n, "best_GFLOPs": flops / best / 1e9, "median_GFLOPs": flops / med / 1e9}


def gemm_rate_numpy(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        best, med = _time_best(lambda: a @ b, repeats)
    flops = 2 * n**3
    return {"tool": "numpy matmul fp32 (BLAS)", "threads": threads, "n": n, "best_GFLOPs": flops / best / 1e9, "median_GFLOPs": flops / med / 1e9}


def measure_ceilings(max_threads: int, quick: bool = False) -> dict:
    """Bandwidth and GEMM rate at 1 and `max_threads` threads; `bandwidth_GBps` and
    `gemm_GFLOPs` are the ceilings at `max_threads` (the threads the backends use)."""
    megabytes, n, repeats = (64, 1024, 3) if quick else (256, 2048, 7)
    thread_counts = sorted({1, max_threads})
    bandwidth = [read_bandwidth_numpy(megabytes, repeats)] + [read_bandwidth_torch(t, megabytes, repeats) for t in thread_counts]
    gemm = [gemm_rate_torch(t, n, repeats) for t in thread_counts]
    try:
        gemm += [gemm_rate_numpy(t, n, repeats) for t in thread_counts]
    except ImportError:  # threadpoolctl absent: numpy's thread count cannot be fixed, so skip it
        pass
    top_bw = max(b["best_GBps"] for b in bandwidth if b["threads"] == max_threads and b["tool"] == "torch.sum")
    top_gemm = max(g["best_GFLOPs"] for g in gemm if g["threads"] == max_threads)
    return {"bandwidth": bandwidth, "gemm": gemm, "bandwidth_GBps": top_bw, "gemm_GFLOPs": top_gemm, "threads": max_threads, "megabytes": megabytes, "n": n, "repeats": repeats}


__all__ = ["measure_ceilings", "read_bandwidth_torch", "read_bandwidth_numpy", "gemm_rate_torch", "gemm_rate_numpy"]
