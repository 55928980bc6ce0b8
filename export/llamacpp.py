"""llama.cpp, built and converted offline: the chat engine's bindings, the bench's ``llama-server``, the GGUFs.

Everything is built from PyPI's llama-cpp-python sdist (it vendors llama.cpp under ``vendor/llama.cpp``) and
cached under the user's cache directory (``VLMSERVE_CACHE_DIR``, default ``~/.cache/vlmserve``), once per version
and ISA level, so every state directory (tests, benches, demos) shares one build::

    <cache>/llama.cpp/<version>/
        llama_cpp_python-<version>.tar.gz     the sdist (``pip download --no-binary :all:``)
        src/                                  the sdist, unpacked (llama.cpp in src/vendor/llama.cpp)
        wheel-<isa>/                          the Python bindings, built for that ISA level (~6 min on 2 cores)
        build-<isa>/bin/llama-server          Release, static, no curl/OpenSSL; BUILD_OK.json when finished
        gguf/<checkpoint>-<outtype>/          hf/ (the conversion copy) and model.gguf; GGUF_OK.json when done

``python -m vlmserve.export.llamacpp`` (``make llamacpp``) builds and installs the bindings into the running
environment:
then ``vlmserve export`` can time and fence the llama.cpp chat engine and choose it (docs/chat.md).

**Portable ISA, never ``-march=native``.** ``GGML_NATIVE=ON`` crashed with Illegal instruction (q8_0 on an AMX
host), so the build names its ISA flags: the level is taken from ``/proc/cpuinfo`` (:func:`isa_level`), AVX-512
only where F/BW/VL/DQ are all present, AMX never. ``GGML_CPU_ALL_VARIANTS`` (one CPU backend per ISA level,
chosen at run time) would compile ggml-cpu a dozen times: too long on a 2-core host.

**The checkpoint.** Only the text model is converted (the bench's chat prompts are text-only). Two things stand
between the perf checkpoint and the vendored ``convert_hf_to_gguf.py``; both are handled on a *copy* (symlinked
weights and tokenizer, its own ``config.json``), so the checkpoint vlmserve serves is untouched:

1. the converter takes the text architecture from ``text_config.architectures``, which the released SmolVLM2
   config sets to ``VLlama3ForCausalLM`` and the locally built perf config lacks: the copy's config adds it;
2. it recognises a BPE pre-tokenizer by hashing the ids the HF tokenizer gives for a fixed text, and refuses
   unknown hashes. The perf tokenizer is trained locally (other merges, so another hash) but its pre-tokenizer is
   exactly GPT-2's: ``ByteLevel(add_prefix_space=False, use_regex=True)``. The converter is run through a small
   wrapper that checks that (and refuses anything else) and declares ``tokenizer.ggml.pre = "gpt-2"``; vocab,
   merges and special tokens are written by the converter itself, all 49280 ids in place. The bench then asks
   the running ``llama-server`` to tokenize the rendered chat prompt and fails unless the ids equal the HF
   tokenizer's (:func:`check_tokenizer`), so both servers prefill the same tokens.
"""


from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vlmserve import paths

VERSION = "0.3.36"  # llama-cpp-python's sdist version (it pins the vendored llama.cpp)
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"

# ISA levels, narrowest first: (name, the /proc/cpuinfo flags it needs, ggml's CMake switches).
_OFF_X86 = ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512", "GGML_AVX512_VBMI",
            "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8",
            "GGML_AMX_BF16"]
ISA_LEVELS: list[tuple[str, frozenset[str], list[str]]] = [
    ("sse42", frozenset(), []),
    ("avx2", frozenset({"avx", "avx2", "fma", "f16c", "bmi2"}),
     ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"]),
    ("avx512", frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
     ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512"]),
]
# Added to the avx512 level when the CPU has them (never AMX: see the module docstring).
_AVX512_EXTRAS = {"avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
                  "avx512vbmi": "GGML_AVX512_VBMI"}

Log = Callable[[str], None]


def root() -> Path:
    return paths.cache_dir() / "llama.cpp" / VERSION


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return set(value.split())
    except OSError:
        pass
    return set()


def isa_level(flags: Iterable[str]) -> tuple[str, list[str]]:
    """The widest ISA level all of whose flags this CPU has: its name (``avx2``, ``avx512-vnni-bf16``...) and
    the ``-D`` switches for ggml, every x86 switch named ON or OFF (nothing left to ``GGML_NATIVE``)."""
    flags = set(flags)
    name, on = ISA_LEVELS[0][0], []
    for level, needs, switches in ISA_LEVELS:
        if needs <= flags:
            name, on = level, list(switches)
    if name == "avx512":
        extras = [(flag, switch) for flag, switch in _AVX512_EXTRAS.items() if flag in flags]
        on += [switch for _, switch in extras]
        name += "".join(f"-{flag.removeprefix('avx512').strip('_')}" for flag, _ in extras)
    return name, ["-DGGML_NATIVE=OFF"] + [f"-D{s}={'ON' if s in on else 'OFF'}" for s in _OFF_X86]


def configure_command(src: Path, build: Path, isa_switches: list[str]) -> list[str]:
    return ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DBUILD_SHARED_LIBS=OFF", *isa_switches]


def build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server"]



def _run(cmd: list[str], log_file: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed (exit {rc}); see {log_file}")


def _progress(cmd: list[str], log_file: Path, log: Log, what: str, every_s: float = 30) -> None:
    """Run ``cmd`` (output to ``log_file``) and say every ``every_s`` how far ninja got."""
    start = time.monotonic()
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(1)
            if time.monotonic() - last >= every_s:
                last = time.monotonic()
                step = _last_ninja_step(log_file)
                log(f"  {what}: {step or 'running'} ({last - start:.0f}s)")
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); see {log_file}")


def _last_ninja_step(log_file: Path) -> str | None:
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    steps = [line.split("]")[0] + "]" for line in tail.splitlines() if line.startswith("[") and "/" in line[:12]]
    return steps[-1] if steps else None


def ensure_source(log: Log) -> Path:
    """The unpacked sdist (downloaded from PyPI once with pip); returns the vendored llama.cpp directory."""
    base = root()
    src = base / "src"
    vendored = src / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").exists():
        return vendored
    base.mkdir(parents=True, exist_ok=True)
    if not (base / SDIST).exists():
        log(f"llama.cpp: downloading the llama-cpp-python {VERSION} sdist from PyPI (~75 MB)")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", str(base)], base / "download.log")
    partial = base / "src.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(base / SDIST) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    (partial / f"llama_cpp_python-{VERSION}").rename(src)
    shutil.rmtree(partial, ignore_errors=True)
    return vendored


def ensure_server(log: Log, jobs: int = 2, flags: Iterable[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """``llama-server`` for this host's ISA level, built on first use (~8 min on 2 cores) and then reused."""
    level, switches = isa_level(cpu_flags() if flags is None else flags)
    build = root() / f"build-{level}"
    binary = build / "bin" / "llama-server"
    stamp = build / "BUILD_OK.json"
    if stamp.exists() and binary.exists():
        return binary, json.loads(stamp.read_text())
    src = ensure_source(log)
    log(f"llama.cpp: building llama-server {VERSION} ({level}: {' '.join(switches)}) in {build}; "
        f"this takes ~8 minutes on 2 cores, once")
    build.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    _run(configure_command(src, build, switches), build / "configure.log")
    _progress(build_command(build, jobs), build / "build.log", log, "building llama-server")
    info = {"version": VERSION, "isa_level": level, "cmake_switches": switches, "jobs": jobs,
            "build_s": round(time.monotonic() - start, 1), "binary": str(binary)}
    stamp.write_text(json.dumps(info, indent=2))
    log(f"llama.cpp: built in {info['build_s']:.0f}s")
    return binary, info


# ---------------------------------------------------------------------------------------------- bindings

# The bindings' own build switches beside the ISA level's: only libllama and ggml (the chat engine feeds its own
# vision encoder's embeddings; no llava/mtmd, no tools, no server).
_WHEEL_SWITCHES = ["-DLLAVA_BUILD=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]


def bindings_version() -> str | None:
    """The installed llama-cpp-python's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def wheel_command(sdist: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", str(sdist), "-w", str(out)]


def ensure_bindings(log: Log, jobs: int = 2, flags: Iterable[str] | None = None) -> dict[str, Any]:
    """llama-cpp-python in this environment: its wheel built from the sdist for this host's ISA level (portable
    switches, never ``-march=native``; ~6 minutes on 2 cores, once, cached) and pip-installed."""
    level, switches = isa_level(cpu_flags() if flags is None else flags)
    out = root() / f"wheel-{level}"
    stamp = out / "WHEEL_OK.json"
    if not stamp.exists():
        ensure_source(log)
        log(f"llama.cpp: building the llama-cpp-python {VERSION} wheel ({level}) in {out}; ~6 minutes on 2 cores, "
            "once")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = {**os.environ, "CMAKE_ARGS": " ".join([*switches, *_WHEEL_SWITCHES]),
               "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
        start = time.monotonic()
        _run(wheel_command(root() / SDIST, out), out / "build.log", env=env)
        wheels = sorted(out.glob("llama_cpp_python-*.whl"))
        stamp.write_text(json.dumps({"version": VERSION, "isa_level": level, "cmake_switches": switches,
                                     "wheel": wheels[-1].name, "build_s": round(time.monotonic() - start, 1)},
                                    indent=2))
    info = json.loads(stamp.read_text())
    if bindings_version() != VERSION:
        log(f"llama.cpp: installing {info['wheel']}")
        _run([sys.executable, "-m", "pip", "install", str(out / info["wheel"])],
             out / "install.log")
    return info


# ---------------------------------------------------------------------------------------------- conversion

# Run as ``python -c`` with the vendored llama.cpp and gguf-py on sys.path: declares the perf tokenizer's
# pre-tokenizer (GPT-2's, checked) instead of the converter's hash lookup, then runs the converter unchanged.
_CONVERT_WRAPPER = """
import json, runpy, sys
from pathlib import Path
model_dir = Path(sys.argv[1])
pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
    sys.exit(f"not GPT-2's byte-level pre-tokenizer, refusing to declare it gpt-2: {pre}")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""


def conversion_config(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as the converter needs it: ``text_config.architectures`` set as in the
    released SmolVLM2 config (``VLlama3ForCausalLM``) when missing. Everything else unchanged."""
    out = json.loads(json.dumps(config))
    text = out.setdefault("text_config", {})
    if not text.get("architectures"):
        text["architectures"] = ["VLlama3ForCausalLM"]
    return out


def convert_command(src: Path, hf_copy: Path, gguf: Path, outtype: str) -> list[str]:
    return [sys.executable, "-c", _CONVERT_WRAPPER, str(hf_copy), "--outtype", outtype, "--outfile", str(gguf)]


def _fingerprint(checkpoint: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".json", ".safetensors")):
        stat = (checkpoint / name).stat()
        h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def ensure_gguf(checkpoint: Path, outtype: str, log: Log, out: Path | None = None) -> Path:
    """The text model of ``checkpoint`` as GGUF (``outtype``: f32, bf16, f16, q8_0), converted once into ``out``
    (default: the cache); returns ``out/model.gguf``."""
    src = ensure_source(log)
    fingerprint = _fingerprint(checkpoint)
    out = out or root() / "gguf" / f"{checkpoint.name}-{outtype}"
    gguf = out / "model.gguf"
    stamp = out / "GGUF_OK.json"
    if stamp.exists() and gguf.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return gguf
    log(f"llama.cpp: converting {checkpoint} (text model) to GGUF {outtype}")
    shutil.rmtree(out, ignore_errors=True)
    hf_copy = out / "hf"
    hf_copy.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (hf_copy / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(conversion_config(config), indent=2))
    env = {**os.environ, "PYTHONPATH": f"{src}:{src / 'gguf-py'}", "NO_LOCAL_GGUF": ""}
    start = time.monotonic()
    _run(convert_command(src, hf_copy, gguf, outtype), out / "convert.log", cwd=src, env=env)
    shutil.rmtree(hf_copy)  # the conversion's scaffold (symlinks into the checkpoint): nothing reads it again
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "checkpoint": str(checkpoint), "outtype": outtype,
                                 "convert_s": round(time.monotonic() - start, 1),
                                 "bytes": gguf.stat().st_size}, indent=2))
    return gguf




if __name__ == "__main__":  # make llamacpp
    print(json.dumps(ensure_bindings(print), indent=2))
