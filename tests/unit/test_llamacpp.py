"""export/llamacpp.py, loadtests/llamacpp.py and the bench's llama.cpp scenarios: what would be built, converted
and run (no build, no server here: the engine's own tests build and run the real thing)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vlmserve.export import llamacpp as build
from vlmserve.loadtests import llamacpp
from vlmserve.loadtests.bench import LLAMA_CPP, chat_scenarios

AVX2_EPYC = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
SAPPHIRE = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "amx_tile",
                        "amx_bf16", "amx_int8"}


def _switches(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=") for a in args)


def test_isa_level_names_every_switch_and_never_native_or_amx() -> None:
    name, args = build.isa_level(AVX2_EPYC)
    sw = _switches(args)
    assert name == "avx2"
    assert sw["GGML_NATIVE"] == "OFF"
    assert all(sw[s] == "ON" for s in ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"))
    assert sw["GGML_AVX512"] == "OFF" and sw["GGML_AMX_INT8"] == "OFF"

    name, args = build.isa_level(SAPPHIRE)
    sw = _switches(args)
    assert name == "avx512-vnni-bf16"
    assert sw["GGML_AVX512"] == sw["GGML_AVX512_VNNI"] == sw["GGML_AVX512_BF16"] == "ON"
    # AMX is what crashed a native build (Illegal instruction): never switched on, even where the CPU has it.
    assert sw["GGML_AMX_TILE"] == sw["GGML_AMX_INT8"] == sw["GGML_AMX_BF16"] == "OFF"
    assert sw["GGML_NATIVE"] == "OFF"


def test_isa_level_needs_every_flag_of_a_level() -> None:
    # AVX-512F without BW/VL/DQ (e.g. Knights Landing) stays at AVX2; no AVX2 at all falls back to SSE.
    assert build.isa_level(AVX2_EPYC | {"avx512f"})[0] == "avx2"
    name, args = build.isa_level({"sse4_2"})
    assert name == "sse42" and "-DGGML_AVX2=OFF" in args


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n\nflags\t: other\n")
    assert build.cpu_flags(info) == {"fpu", "avx", "avx2", "fma"}
    assert build.cpu_flags(tmp_path / "missing") == set()


def test_build_commands(tmp_path: Path) -> None:
    _, switches = build.isa_level(AVX2_EPYC)
    configure = build.configure_command(tmp_path / "src", tmp_path / "build", switches)
    assert configure[:5] == ["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "build")]
    assert configure[configure.index("-G") + 1] == "Ninja"
    for flag in ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON"):
        assert flag in configure
    assert not any("march=native" in a for a in configure)
    assert build.build_command(tmp_path / "build", 2) == ["cmake", "--build", str(tmp_path / "build"), "-j", "2",
                                                             "--target", "llama-server"]


def test_server_command_has_a_slot_per_user_and_context_for_each() -> None:
    cmd = llamacpp.server_command(Path("/x/llama-server"), Path("/m/model.gguf"), 8123, slots=32, threads=2)
    assert cmd[0] == "/x/llama-server"

    def arg(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert arg("-m") == "/m/model.gguf" and arg("--port") == "8123" and arg("--host") == "127.0.0.1"
    assert arg("-np") == "32" and arg("-t") == "2" and arg("-tb") == "2"
    assert int(arg("-c")) == 32 * llamacpp.CTX_PER_SLOT
    assert "--cont-batching" in cmd
    # The GGUF's own chat template (the checkpoint's, rendered by llama-server's jinja), checked against HF at run
    # time; no --chat-template: with jinja on (the default) a built-in name would be taken as the template text.
    assert "--chat-template" not in cmd and "--poll" not in cmd
    polled = llamacpp.server_command(Path("/x/llama-server"), Path("/m/model.gguf"), 8123, slots=1, poll=0)
    assert polled[-2:] == ["--poll", "0"]


def test_conversion_config_adds_the_text_architecture_only_when_missing() -> None:
    config = {"architectures": ["SmolVLMForConditionalGeneration"], "text_config": {"vocab_size": 49280}}
    out = build.conversion_config(config)
    assert out["text_config"]["architectures"] == ["VLlama3ForCausalLM"]
    assert out["text_config"]["vocab_size"] == 49280 and out["architectures"] == config["architectures"]
    assert "architectures" not in config["text_config"]  # a copy: the served checkpoint's config is untouched
    kept = build.conversion_config({"text_config": {"architectures": ["LlamaForCausalLM"]}})
    assert kept["text_config"]["architectures"] == ["LlamaForCausalLM"]


def test_convert_command_runs_the_vendored_converter_with_the_outtype(tmp_path: Path) -> None:
    cmd = build.convert_command(tmp_path / "src", tmp_path / "hf", tmp_path / "model.gguf", "f32")
    assert cmd[1] == "-c" and "convert_hf_to_gguf.py" in cmd[2] and '"gpt-2"' in cmd[2]
    assert cmd[3:] == [str(tmp_path / "hf"), "--outtype", "f32", "--outfile", str(tmp_path / "model.gguf")]


@pytest.mark.parametrize("pre", [
    {"type": "Metaspace", "replacement": "\u2581"},
    {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
])
def test_converter_wrapper_refuses_a_pre_tokenizer_that_is_not_gpt2s(tmp_path: Path, pre: dict) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
    cmd = build.convert_command(tmp_path, tmp_path, tmp_path / "model.gguf", "f32")
    # Refused before the vendored converter is imported (it is not on the path here).
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and "refusing to declare it gpt-2" in done.stderr
    assert not (tmp_path / "model.gguf").exists()


def test_chat_scenarios_lockstep_and_staggered_side_by_side() -> None:
    targets = {"vlmserve": "http://gw", LLAMA_CPP: "http://llama"}
    scenarios = chat_scenarios(targets, (1, 8, 32), 30, 64, think_s=2.0,
                               extra={LLAMA_CPP: llamacpp.REQUEST_EXTRA})
    names = [s.name for s in scenarios]
    assert names == [f"chat-{system}-{n}u{mode}" for n in (1, 8, 32) for mode in ("", "-staggered")
                     for system in ("vlmserve", LLAMA_CPP)]
    by = {s.name: s for s in scenarios}
    lock, stag = by["chat-llama.cpp-8u"], by["chat-llama.cpp-8u-staggered"]
    assert lock.users == stag.users == 8 and lock.host == "http://llama" and lock.user_class == "ChatUser"
    assert lock.env["VLMSERVE_BENCH_THINK_S"] == "0.0" and stag.env["VLMSERVE_BENCH_THINK_S"] == "2.0"
    assert json.loads(lock.env["VLMSERVE_BENCH_CHAT_EXTRA"]) == {"ignore_eos": True, "cache_prompt": False}
    ours = by["chat-vlmserve-8u"]
    assert "VLMSERVE_BENCH_CHAT_EXTRA" not in ours.env
    # The same request for both: prompt, length, no image.
    for key in ("VLMSERVE_BENCH_MAX_NEW_TOKENS", "VLMSERVE_BENCH_CHAT_IMAGE", "VLMSERVE_BENCH_CHAT_PROMPT"):
        assert ours.env[key] == lock.env[key]
    assert ours.env["VLMSERVE_BENCH_MAX_NEW_TOKENS"] == "64"
    # No think time: lockstep only.
    assert [s.name for s in chat_scenarios(targets, (1,), 30, 64)] == ["chat-vlmserve-1u", "chat-llama.cpp-1u"]
