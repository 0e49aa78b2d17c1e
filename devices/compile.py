"""`compile(spec, backend, quant, max_context)`: an `ArchSpec` -> a cached, checked `Artifact`.

The dispatcher is backend-neutral: it validates the request, looks the artifact up in the
on-disk cache, has the backend module (see `devices.backends`) export into a temporary
folder, writes the manifest, checks the artifact against eager, and only then renames
the folder into the cache. A folder in the cache is therefore always complete and
checked, and concurrent compiles of the same key cannot corrupt each other (a file lock
makes the second one wait for, then reuse, the first one's result).

Cache layout: `<cache>/artifacts/<artifact_key>` (`-seed<N>` appended for a seed other
than 0: the weights differ, the latency does not). The cache root is `cache_dir`, else
`$LFM2_NAS_CACHE`, else `~/.cache/lfm2-nas`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devices.artifact import MANIFEST, Artifact, ArtifactError, artifact_key, check_backend_quant, toolchain_versions, write_manifest
from devices.backends import backend_module, open_runner
from lfm2.errors import EnvironmentFailure, UserError
from lfm2.spec import ArchSpec

if TYPE_CHECKING:
    import numpy as np

#: Decode steps the check against eager runs after its prefill.
VERIFY_DECODE_STEPS = 8
#: fp32: the largest |backend - eager| logit difference allowed, relative to the largest
#: |eager logit| (floored at 1). Observed: ExecuTorch/XNNPACK ~1e-6, eager 0.
FP32_REL_TOL = 1e-4
#: Quantised: the artifact is checked against the SAME quantised model run eagerly (the
#: backend's `reference_model`), so the check tests the toolchain (export, lowering,
#: runtime), not the quantiser. Every step's logits must have at least this cosine similarity
#: with the reference's, and the argmax must agree on at least this fraction of the steps.
#: Observed: ExecuTorch 8da4w vs the torchao-quantised eager model, cosine 0.9997, top-1 1.00;
#: ONNX Runtime int8 vs its eager int8 reference, LFM2-350M at 2,048 tokens: max |diff| 7e-7,
#: cosine 1 - 1e-14, top-1 1.00 (against fp32: cosine 0.964, top-1 0.78).
QUANT_MIN_COSINE = 0.999
QUANT_MIN_TOP1 = 0.95
#: The top-1 bound counts only the steps where the reference's choice is decisive: its best
#: logit leads the runner-up by more than DECISIVE_MARGIN times the step's RMS difference
#: between reference and artifact. Random weights give nearly flat logits, so on a near-tie
#: the runtime's own rounding picks either token: seen on llama.cpp Q4_0 (its 8-bit activations),
#: the Qwen3-shaped model and LFM2-350M's all-attention twin at cosine 0.9998 / 0.9992 with one
#: of 9 steps flipped (top-1 0.89). A flip on a decisive step needs two logits each off by
#: several RMS in opposite directions, which the runtime's rounding does not do; a broken
#: artifact is caught by the cosine bound, which every step counts.
DECISIVE_MARGIN = 6.0
#: ... unless the quantised reference cannot meet that bound against itself. Its int8 dynamic
#: activations round to a grid, so an fp32-rounding-sized change of its input flips some
#: roundings, and a deep model of random weights amplifies the flips: LFM2-350M's 8da4w
#: reference against itself with its embedding output scaled by 1 + 1e-7 has a logit cosine
#: of 0.9978 (prefill of 128 tokens) and 0.9929 (2,048 tokens and 8 decode steps) -- below
#: 0.999 -- while its ExecuTorch program (every linear equal to torchao's to 3e-7) is at
#: 0.9911. So a quantised artifact also passes when its distance (1 - cosine) is within
#: `QUANT_FLOOR_FACTOR` times that floor, measured on the same tokens (computed only when the
#: fixed bound fails). A wrong scale in one linear of a small model is still caught
#: (tests/test_compile_executorch.py).
QUANT_FLOOR_PERTURBATION = 1e-7
QUANT_FLOOR_FACTOR = 4.0


class CompileError(EnvironmentFailure):
    """Compiling a spec failed. `stage` names the step (inputs, export, quantise, lower,
    serialize, verify, ...), `cause` the underlying exception (or None)."""

    def __init__(self, stage: str, message: str, cause: BaseException | None = None):
        self.stage = stage
        self.cause = cause
        detail = f": {type(cause).__name__}: {_first_lines(str(cause))}" if cause is not None else ""
        super().__init__(f"compile failed at stage {stage!r}: {message}{detail}")


class CachedCompileError(CompileError):
    """This request failed before with the same toolchain (see `compile`'s `retry_failed`)."""

    def __init__(self, stage: str, text: str):
        self.stage, self.cause = stage, None
        EnvironmentFailure.__init__(self, text)


class CompileInputError(UserError, CompileError):
    """The compile request itself is impossible (a prompt longer than the context, ...): bad
    input, so the CLI exits 2 like any `UserError`; still a `CompileError` for the search."""


class VerificationError(CompileError):
    """The compiled artifact's logits disagree with eager beyond the stated tolerance."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__("verify", message)
        self.report = report


def _first_lines(text: str, limit: int = 12) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:limit]) + (f"\n... ({len(lines) - limit} more lines)" if len(lines) > limit else "")


class Stages:
    """Times the named stages of an export; an exception inside a stage becomes a
    `CompileError` that names it. `seconds` goes into the manifest as `stages_s`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(name, "the toolchain raised an error", exc) from exc
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LFM2_NAS_CACHE") or Path.home() / ".cache" / "lfm2-nas")


def check_request(spec: ArchSpec, backend: str, quant: str, max_context: int, prompt_lengths: Iterable[int]) -> tuple[int, ...]:
    """Validate a compile request before any work; returns the sorted prompt lengths."""
    if not isinstance(spec, ArchSpec):
        raise UserError(f"compile takes an ArchSpec, got {type(spec).__name__}")
    check_backend_quant(backend, quant)
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise CompileInputError("inputs", f"max_context must be a positive integer, got {max_context!r}")
    if isinstance(prompt_lengths, int):
        prompt_lengths = (prompt_lengths,)
    lengths = tuple(sorted(set(prompt_lengths)))
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise CompileInputError("inputs", f"prompt lengths must be positive integers, got {tuple(prompt_lengths)!r}")
    if lengths[-1] > max_context:
        raise CompileInputError(
            "inputs",
            f"prompt length {lengths[-1]} does not fit in max_context={max_context}: "
            f"raise max_context to at least {lengths[-1]} or drop that prompt length",
        )
    if max_context > spec.max_seq_len:
        raise CompileInputError("inputs", f"max_context={max_context} exceeds the spec's max_seq_len={spec.max_seq_len}")
    return lengths


#: Work folders of a compile are `<artifacts>/.tmp-<name>-<random>`, made under `<name>`'s lock.
WORK_PREFIX = ".tmp-"


def lock_path(artifacts: Path, name: str) -> Path:
    """The lock a compile (or a prune) of artifact `name` holds while it works on it."""
    return artifacts / f".{name}.lock"


def artifact_of_work_folder(folder_name: str) -> str:
    """`.tmp-<name>-<random>` -> `<name>` (mkdtemp's random part has no '-')."""
    return folder_name[len(WORK_PREFIX):].rsplit("-", 1)[0]


@contextlib.contextmanager
def artifact_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock at `path`; with `wait=False`, yield False at once if another holds it."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rewrite_manifest(artifact: Artifact) -> None:
    """Replace manifest.json atomically (it is not among the hashed files)."""
    target = artifact.path / MANIFEST
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(artifact.manifest, indent=2, sort_keys=True))
    os.replace(tmp, target)


def compile(
    spec: ArchSpec,
    backend: str,
    quant: str,
    max_context: int,
    prompt_lengths: Iterable[int] = (128,),
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    verify: bool = True,
    retry_failed: bool = False,
) -> Artifact:
    """Compile `spec` for `backend` at `quant` with K/V buffers for `max_context` tokens,
    for the given prompt lengths (a backend that runs any length, as ExecuTorch's chunked
    prefill does, records them and is verified at the shortest); cached, and checked
    against eager unless `verify=False`. Raises `CompileError` (with `.stage`) when it cannot.

    A failure that would repeat (the toolchain refused the model, or the artifact disagrees
    with eager) is cached too, per toolchain versions, so a search does not spend minutes
    failing the same candidate again; `retry_failed=True` compiles anyway. Failures that
    may not repeat (out of memory, a signal, a full disk) are not cached."""
    lengths = check_request(spec, backend, quant, max_context, prompt_lengths)
    key = artifact_key(spec, backend, quant, max_context, lengths)
    name = key if seed == 0 else f"{key}-seed{seed}"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    final = artifacts / name
    failure_path = artifacts / f".{name}.failed.json"
    with artifact_lock(lock_path(artifacts, name)):
        if not retry_failed:
            _raise_cached_failure(failure_path, verify)
        if (final / MANIFEST).is_file():
            try:
                artifact = Artifact.load(final)
            except ArtifactError:
                shutil.rmtree(final)  # damaged: compile it again below
            else:
                if verify and not artifact.manifest.get("verification"):
                    artifact.manifest["verification"] = verify_against_eager(artifact, seed)
                    _rewrite_manifest(artifact)
                with contextlib.suppress(OSError):  # the last use, for `lfm2-nas cache prune` (LRU)
                    os.utime(final / MANIFEST)
                return artifact
        elif final.exists():
            shutil.rmtree(final)  # no manifest: an incomplete folder from outside compile
        # Work folders of this artifact are only made under its lock, which is ours now: any
        # left are from a compile that was killed (a search stopped with SIGKILL, an OOM).
        for leftover in artifacts.glob(f"{WORK_PREFIX}{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{name}-", dir=artifacts))
        try:
            start = time.perf_counter()
            files, facts = backend_module(backend).export(spec, quant, max_context, lengths, tmp, seed)
            compile_s = round(time.perf_counter() - start, 3)
            artifact = write_manifest(tmp, spec, backend, quant, max_context, lengths, files, seed=seed, compile_s=compile_s, verification=None, **facts)
            if verify:
                artifact.manifest["verification"] = verify_against_eager(artifact, seed)
                _rewrite_manifest(artifact)
            os.rename(tmp, final)
        except CompileError as exc:
            if _repeatable(exc):
                _record_failure(failure_path, exc)
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Artifact.load(final)


def _repeatable(exc: CompileError) -> bool:
    """Would compiling again fail the same way? Not after running out of memory or disk."""
    cause = exc.cause
    while cause is not None:
        if isinstance(cause, (MemoryError, OSError, KeyboardInterrupt)):
            return False
        cause = cause.__cause__
    return True


def _record_failure(path: Path, exc: CompileError) -> None:
    record = {"stage": exc.stage, "error": str(exc), "toolchain": toolchain_versions(), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if isinstance(exc, VerificationError):
        record["report"] = exc.report
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def _raise_cached_failure(path: Path, verify: bool) -> None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if record.get("toolchain") != toolchain_versions():
        path.unlink(missing_ok=True)  # another toolchain may compile it: try again
        return
    if record.get("stage") == "verify" and not verify:
        return  # it compiled; only the check failed, and it is not asked for
    raise CachedCompileError(record.get("stage", "?"), f"{record.get('error')} [cached: this request failed the same way on {record.get('when')} "
                             f"with this toolchain; retry_failed=True, or deleting {path}, compiles it again]")


# -- the check against eager --------------------------------------------------------------


def reference_model(artifact: Artifact, seed: int):
    """The eager model the artifact must reproduce: the fp32 model for an fp32 artifact; for
    a quantised one its backend's `reference_model(artifact, seed)`, the model at the
    deployed precision (quantised the same way), which every backend with a quantised
    precision must define. Returns (model, name of the reference)."""
    from lfm2.model import build_model

    if artifact.quant == "fp32":
        return build_model(artifact.spec, seed=seed).eval(), "fp32 eager"
    hook = getattr(backend_module(artifact.backend), "reference_model", None)
    if hook is None:
        raise CompileError("verify", f"the {artifact.backend} backend has no reference_model for its {artifact.quant} artifacts: "
                           "define reference_model(artifact, seed) in its module (the eager model at that precision)")
    model, name = hook(artifact, seed)
    return model.eval(), name


def step_logits(model, max_context: int, tokens: np.ndarray, prompt_length: int) -> np.ndarray:
    """Logits [1 + decode steps, vocab] of `model.step`: one prefill, then one token at a time."""
    import torch

    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        logits, *state = model.step(ids[:, :prompt_length], torch.zeros(1, dtype=torch.long), *model.init_state(1, max_context=max_context))
        rows = [logits[0]]
        for pos in range(prompt_length, ids.shape[1]):
            logits, *state = model.step(ids[:, pos : pos + 1], torch.tensor([pos]), *state)
            rows.append(logits[0])
    return torch.stack(rows).float().numpy()


def eager_reference(spec: ArchSpec, seed: int, max_context: int, tokens: np.ndarray, prompt_length: int) -> np.ndarray:
    """Logits [1 + decode steps, vocab] of the fp32 eager model: one prefill, then one token at a time."""
    from lfm2.model import build_model

    return step_logits(build_model(spec, seed=seed).eval(), max_context, tokens, prompt_length)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    import numpy as np  # here, not at the top: `import devices` (every CLI start) must not pay for numpy
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    cosine = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-30)
    top1 = ref.argmax(-1) == got.argmax(-1)
    ordered = np.sort(ref, axis=-1)
    margin = ordered[:, -1] - ordered[:, -2] if ref.shape[-1] > 1 else np.full(ref.shape[0], np.inf)
    decisive = margin > DECISIVE_MARGIN * np.sqrt(((ref - got) ** 2).mean(-1))
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "top1_agreement": float(top1.mean()),
        # over the decisive steps only (DECISIVE_MARGIN); 1.0 when no step is decisive
        "top1_agreement_decisive": float(top1[decisive].mean()) if decisive.any() else 1.0,
        "decisive_steps": int(decisive.sum()),
        "steps": int(ref.shape[0]),
    }


def _reference_floor(model, max_context: int, tokens: np.ndarray, prompt_length: int, expected: np.ndarray) -> dict[str, Any]:
    """The quantised reference against itself with its embedding output scaled by
    1 + QUANT_FLOOR_PERTURBATION (see QUANT_FLOOR_FACTOR)."""
    handle = model.embed_tokens.register_forward_hook(lambda _module, _inputs, output: output * (1.0 + QUANT_FLOOR_PERTURBATION))
    try:
        perturbed = step_logits(model, max_context, tokens, prompt_length)
    finally:
        handle.remove()
    floor = compare_logits(expected, perturbed)
    return {"perturbation": QUANT_FLOOR_PERTURBATION, "min_cosine": floor["min_cosine"], "top1_agreement": floor["top1_agreement"]}


def _top1(report: dict[str, Any]) -> float:
    """The top-1 agreement a bound is checked on: over the decisive steps (a report made
    before they were counted: over every step)."""
    return report.get("top1_agreement_decisive", report["top1_agreement"])


def _top1_text(report: dict[str, Any]) -> str:
    if "decisive_steps" not in report:
        return f"top-1 agreement {report['top1_agreement']:.2f}"
    return f"top-1 agreement {_top1(report):.2f} on {report['decisive_steps']} decisive step(s) of {report['steps']} ({report['top1_agreement']:.2f} on all)"


def _tolerance(quant: str, own: dict[str, float] | None, report: dict[str, Any]) -> tuple[dict[str, float], bool, str]:
    """(the bounds, whether the report is within them, the reason if not). A backend module
    may state its own per precision (`VERIFY_TOLERANCES[quant]`: `min_cosine`,
    `top1_agreement`, `max_abs_diff_rel` of the largest logit), where its runtime's own
    arithmetic (f16 activations, 8-bit dot products) sits between it and any eager model."""
    import numpy as np  # here, not at the top: `import devices` (every CLI start) must not pay for numpy
    if own:
        bound = own.get("max_abs_diff_rel", np.inf) * max(1.0, report["max_abs_logit"])
        ok = report["max_abs_diff"] <= bound and report["min_cosine"] >= own.get("min_cosine", -1.0) and _top1(report) >= own.get("top1_agreement", 0.0)
        diff = f"max |logit diff| {report['max_abs_diff']:.3g} (bound {bound:.3g}), " if np.isfinite(bound) else ""
        why = f"{diff}min cosine {report['min_cosine']:.5f}, {_top1_text(report)}, against {own}"
        return dict(own), ok, why
    if quant == "fp32":
        bound = FP32_REL_TOL * max(1.0, report["max_abs_logit"])
        return {"max_abs_diff": bound}, report["max_abs_diff"] <= bound, f"max |logit diff| {report['max_abs_diff']:.3g} > {bound:.3g}"
    cosine, top1 = QUANT_MIN_COSINE, QUANT_MIN_TOP1
    floor = report.get("reference_floor")
    if floor is not None:  # the reference's own noise floor is the coarser bound
        cosine = min(cosine, 1.0 - QUANT_FLOOR_FACTOR * (1.0 - floor["min_cosine"]))
    ok = report["min_cosine"] >= cosine and _top1(report) >= top1
    why = f"min cosine {report['min_cosine']:.4f} (needs {cosine:.4g}), {_top1_text(report)} (needs {top1})"
    if floor is not None:
        why += f"; the reference against itself, input x (1 + {floor['perturbation']:g}): min cosine {floor['min_cosine']:.4f}"
    return {"min_cosine": cosine, "top1_agreement": top1}, ok, why


def verify_against_eager(artifact: Artifact, seed: int) -> dict[str, Any]:
    """Run a prefill of the shortest prompt length and up to 8 decode steps through the
    artifact's runner and through the eager model at the same precision (same seeded
    weights, same tokens; see `reference_model`); raise `VerificationError` beyond the
    tolerance, else return the observed numbers. For a quantised artifact the distance to
    the fp32 model is recorded too (`fp32_distance`), as information: it measures the
    quantisation error of these (random) weights, never a reason to reject."""
    import numpy as np  # here, not at the top: `import devices` (every CLI start) must not pay for numpy
    start = time.perf_counter()
    prompt_length = min(artifact.prompt_lengths)
    steps = min(VERIFY_DECODE_STEPS, artifact.max_context - prompt_length)
    spec = artifact.spec
    tokens = np.random.default_rng(seed).integers(0, spec.vocab_size, size=(1, prompt_length + steps), dtype=np.int64)
    try:
        with open_runner(artifact) as runner:
            rows = [np.asarray(runner.prefill(tokens[:, :prompt_length]))[0]]
            for pos in range(prompt_length, prompt_length + steps):
                rows.append(np.asarray(runner.decode(tokens[:, pos : pos + 1], pos))[0])
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError("verify", f"running the {artifact.backend} artifact failed", exc) from exc
    observed = np.stack(rows)
    try:
        model, reference = reference_model(artifact, seed)
        expected = step_logits(model, artifact.max_context, tokens, prompt_length)
    except Exception as exc:
        raise CompileError("verify", f"building the eager reference of the {artifact.backend}/{artifact.quant} artifact failed", exc) from exc
    report = compare_logits(expected, observed)
    report.update(prompt_length=prompt_length, decode_steps=steps, reference=reference)
    own_tolerance = getattr(backend_module(artifact.backend), "VERIFY_TOLERANCES", {}).get(artifact.quant)
    if artifact.quant != "fp32" and not own_tolerance and report["min_cosine"] < QUANT_MIN_COSINE:
        try:
            report["reference_floor"] = _reference_floor(model, artifact.max_context, tokens, prompt_length, expected)
        except Exception as exc:
            raise CompileError("verify", "measuring the reference's own noise floor failed", exc) from exc
    del model
    if artifact.quant != "fp32":
        fp32 = eager_reference(spec, seed, artifact.max_context, tokens, prompt_length)
        report["fp32_distance"] = {k: v for k, v in compare_logits(fp32, observed).items() if k != "steps"}
    tolerance, ok, why = _tolerance(artifact.quant, own_tolerance, report)
    report["tolerance"] = tolerance
    ok = ok and bool(np.isfinite(observed).all())
    report["passed"] = bool(ok)
    report["seconds"] = round(time.perf_counter() - start, 3)
    if not ok:
        distance = report.get("fp32_distance")
        info = f"; against fp32: min cosine {distance['min_cosine']:.4f}, top-1 {distance['top1_agreement']:.2f} (quantisation error, for information)" if distance else ""
        raise VerificationError(f"the {artifact.backend}/{artifact.quant} artifact disagrees with its reference ({reference}): {why}{info}", report)
    return report


__all__ = [
    "CompileError",
    "CompileInputError",
    "VerificationError",
    "Stages",
    "compile",
    "check_request",
    "default_cache_dir",
    "verify_against_eager",
    "compare_logits",
    "eager_reference",
    "reference_model",
    "step_logits",
]
