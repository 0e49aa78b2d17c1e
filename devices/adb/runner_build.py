"""Build and find `lfm2-runner` (devices/adb/runner): the program the adb agent pushes.

A runner build is a folder: `lfm2-runner`, the shared libraries it needs (none for a static
phone build), and `runner.json` ({"abi", "version", ...}) written by its CMakeLists.txt. The
agent pushes the whole folder and refuses a phone whose ABI list lacks the build's ABI.

`build_runner()` runs CMake: for this machine against the llama.cpp libraries of the
llama-cpp-python wheel (the same llama.cpp the Python backend runs), or for a phone with the
Android NDK's toolchain file and llama.cpp's sources. Builds are cached by the hash of the
runner's sources and the build settings, so the tests build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm2.errors import UserError

SOURCE_DIR = Path(__file__).resolve().parent / "runner"
PROGRAM = "lfm2-runner"
MANIFEST = "runner.json"
DEFAULT_ANDROID_ABI = "arm64-v8a"
DEFAULT_ANDROID_API = 28


class RunnerBuildError(UserError):
    pass


@dataclass(frozen=True)
class RunnerBuild:
    """A built runner folder and what its runner.json says."""

    path: Path
    abi: str
    version: str
    facts: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        """What is pushed: the program, its shared libraries, runner.json."""
        return sorted(p for p in self.path.iterdir() if p.is_file() and (p.name in (PROGRAM, MANIFEST) or ".so" in p.name))

    @property
    def key(self) -> str:
        """Content hash of the files pushed: the folder on the phone is named by it."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()[:16]


def load_runner(path: str | Path) -> RunnerBuild:
    folder = Path(path).expanduser().resolve()
    if folder.is_file():
        folder = folder.parent
    program, manifest = folder / PROGRAM, folder / MANIFEST
    if not program.is_file() or not manifest.is_file():
        raise RunnerBuildError(
            f"{folder} is not a runner build (it needs {PROGRAM} and {MANIFEST}): build one with `lfm2-nas agent build-runner` "
            "(add --android-ndk for a phone; see the README, 'Measuring on an Android phone')"
        )
    try:
        facts = json.loads(manifest.read_text())
        abi, version = str(facts["abi"]), str(facts.get("version", "unknown"))
    except (ValueError, KeyError, TypeError) as exc:
        raise RunnerBuildError(f"{manifest} is not a runner manifest ({exc}); build the runner again") from None
    return RunnerBuild(folder, abi, version, facts)


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    return Path(os.environ.get("LFM2_NAS_CACHE") or Path.home() / ".cache" / "lfm2-nas") / "adb-runner"


def wheel_llama_dirs() -> tuple[Path, Path]:
    """(lib dir, include dir) of the installed llama-cpp-python wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise RunnerBuildError('building the runner for this machine links the llama-cpp-python wheel\'s llama.cpp: pip install -e ".[llamacpp]"')
    package = Path(spec.origin).parent
    lib, include = package / "lib", package.parent / "include"
    if not (lib / "libllama.so").exists() or not (include / "llama.h").exists():
        raise RunnerBuildError(f"the llama-cpp-python install has no {lib / 'libllama.so'} or {include / 'llama.h'}: reinstall it (pip install --force-reinstall llama-cpp-python==0.3.36)")
    return lib, include


def build_runner(
    out_dir: str | Path | None = None,
    *,
    android_ndk: str | Path | None = None,
    llama_cpp_source: str | Path | None = None,
    abi: str = DEFAULT_ANDROID_ABI,
    api_level: int = DEFAULT_ANDROID_API,
    jobs: int = 2,
) -> RunnerBuild:
    """Build the runner (cached by sources and settings) and return it.

    Without `android_ndk`: for this machine, linking the llama-cpp-python wheel's llama.cpp
    (or `llama_cpp_source` built statically). With it: for a phone of `abi` at `api_level`,
    building `llama_cpp_source` (required) with the NDK's toolchain file."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RunnerBuildError("building the runner needs cmake (apt-get install cmake) and a C++ compiler")
    args = [f"-DLFM2_RUNNER_VERSION={source_hash()}", "-DCMAKE_BUILD_TYPE=Release"]
    if android_ndk is not None:
        toolchain = Path(android_ndk).expanduser() / "build" / "cmake" / "android.toolchain.cmake"
        if not toolchain.is_file():
            raise RunnerBuildError(f"{toolchain} does not exist: --android-ndk must be the NDK's root folder (r26 or newer)")
        if llama_cpp_source is None:
            raise RunnerBuildError("a phone build compiles llama.cpp from source: give --llama-cpp-source (e.g. the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp)")
        args += [f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", f"-DANDROID_ABI={abi}", f"-DANDROID_PLATFORM=android-{api_level}", "-DGGML_OPENMP=OFF", "-DGGML_LLAMAFILE=OFF"]
    if llama_cpp_source is not None:
        source = Path(llama_cpp_source).expanduser().resolve()
        if not (source / "CMakeLists.txt").is_file() or not (source / "include" / "llama.h").is_file():
            raise RunnerBuildError(f"{source} is not a llama.cpp source tree (no CMakeLists.txt and include/llama.h)")
        args.append(f"-DLLAMA_CPP_SOURCE_DIR={source}")
    else:
        lib, include = wheel_llama_dirs()
        args += [f"-DLLAMA_LIB_DIR={lib}", f"-DLLAMA_INCLUDE_DIR={include}"]
    settings = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    build_dir = Path(out_dir).expanduser().resolve() if out_dir else _cache_root() / f"{source_hash()}-{settings}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two tests (or agents) building at once wait for one build
        built = build_dir / ".built"
        if built.is_file() and built.read_text() == settings and (build_dir / PROGRAM).is_file() and (build_dir / MANIFEST).is_file():
            return load_runner(build_dir)
        for command in ([cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), *args], [cmake, "--build", str(build_dir), "-j", str(jobs), "--target", PROGRAM]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RunnerBuildError(f"building the runner failed at `{' '.join(command[:2])} ...`:\n{(done.stdout + done.stderr)[-3000:]}")
        (build_dir / ".built").write_text(settings)
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
    return load_runner(build_dir)


__all__ = ["RunnerBuild", "RunnerBuildError", "build_runner", "load_runner", "source_hash", "wheel_llama_dirs", "PROGRAM", "MANIFEST"]
