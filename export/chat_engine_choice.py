"""Which engine decodes a chat family on this host: the torch loop or llama.cpp, fenced and timed at export.

The llama.cpp candidate is the checkpoint's text model converted to GGUF (``export/llamacpp.py``: f32, and bf16
where the CPU has native bf16), run by :class:`vlmserve.model_repository.llamacpp_engine.LlamaCppLoop`. It is **fenced**
where the user sees it — the language model's next-token logits, teacher-forced over realistic chat prompts and
the reference's own greedy continuation, against the transformers fp32 model: minimum cosine >= 0.999 and argmax
agreement >= 99% of positions (the floors of ``export/runtime_choice.py``) — and **timed** against the torch loop
(the precision export chose for it) on the same batched greedy workload (``USERS`` prompts decoded together, as
the served engine runs them), interleaved round by round. The fastest faithful engine wins; llama.cpp must beat
the torch loop by ``MARGIN``.

``--chat-engine torch`` skips all of it; ``--chat-engine llamacpp`` builds the bindings when they are missing
(``make llamacpp``, ~6 minutes once) and takes llama.cpp if it is faithful; ``auto`` (the default) considers
llama.cpp only where the bindings are installed, and says so in the report when they are not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmserve.export import photos
from vlmserve.export.runtime_choice import ARGMAX_FLOOR, FIDELITY_FLOOR, MARGIN, SELECTION_VERSION
from vlmserve.host import CpuInfo, cpu_info

ENGINE_CHOICES = ("auto", "torch", "llamacpp")
USERS = 8
LLAMACPP_MAX_BATCH = 32  # rows of a served llama.cpp loop (the config's max_batch when llama.cpp is chosen)
MAX_TOKENS = 32
ROUNDS = 2
REPORT_FILE = "engine_choice.json"


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """Realistic chat prompts: the checkpoint's chat template around natural questions, as token ids."""
    out = []
    for i in range(count):
        sentence = photos.SENTENCES[i % len(photos.SENTENCES)]
        messages = [{"role": "user", "content": [{"type": "text", "text": f"Describe this scene: {sentence}"}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def fence_gguf(model, prompts: list[list[int]], gguf: Path, new_tokens: int = 16) -> dict[str, Any]:
    """Teacher-forced next-token logits of ``gguf`` (llama.cpp) vs ``model`` (transformers, fp32) over each prompt
    and the reference's greedy continuation: the minimum cosine and the argmax agreement over all positions."""
    import numpy as np
    import torch

    from vlmserve.model_repository.llamacpp_engine import LlamaCppModel

    longest = max(len(p) for p in prompts) + new_tokens
    llama = LlamaCppModel(gguf, cells=longest, sequences=1)
    cosines, agree, positions = [], 0, 0
    try:
        for prompt in prompts:
            with torch.no_grad():
                mask = torch.ones(1, len(prompt), dtype=torch.long)
                ids = model.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=new_tokens,
                                     do_sample=False, num_beams=1)[0].tolist()
                expected = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            llama.clear()
            got = llama.decode([(t, p, 0, True) for p, t in enumerate(ids)])
            expected = expected[:, : got.shape[1]]
            cos = (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
            cosines.append(float(cos.min()))
            agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
            positions += len(ids)
    finally:
        llama.close()
    return {"min_cosine": min(cosines), "argmax_agreement": agree / positions, "positions": positions}


def time_loops(makers: dict[str, Callable[[], Any]], prompts: list[list[int]], max_tokens: int = MAX_TOKENS,
               rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Each engine's loop decoding ``prompts`` together (greedy, ``max_tokens`` each), interleaved round by round:
    median output tokens per second and the tokens they gave (engines that agree produce the same work)."""
    from vlmserve.api.openai import GenerationParameters
    from vlmserve.model_repository.chat_engine import ChatJob

    seconds: dict[str, list[float]] = {name: [] for name in makers}
    tokens: dict[str, int] = {}
    for _ in range(rounds):
        for name, make in makers.items():
            loop = make()
            jobs = [ChatJob({"input_ids": ids}, GenerationParameters(max_tokens=max_tokens), len(ids),
                            lambda *_: None) for ids in prompts]
            start = time.perf_counter()
            for job in jobs:
                loop.add(job)
            loop.drain()
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = sum(len(j.token_ids) for j in jobs)
            close = getattr(getattr(loop, "llama", None), "close", None)
            if close:
                close()
    return {name: {"seconds": statistics.median(s), "tokens": tokens[name],
                   "tokens_per_s": tokens[name] / statistics.median(s)} for name, s in seconds.items()}


def choose_chat_engine(model, family, source_dir: Path, out_dir: Path, engine: str, torch_precision: str,
                       log: Callable[[str], None], cpu: CpuInfo | None = None) -> dict[str, Any]:
    """The report of the choice (``engine``: ``torch`` or ``llamacpp``; ``gguf``: the file in ``out_dir`` when
    llama.cpp won). ``model``: the transformers fp32 reference; ``family``: the serving pipeline, for the loops."""
    from vlmserve.export import llamacpp

    if engine not in ENGINE_CHOICES:
        raise ValueError(f"--chat-engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
    cpu = cpu or cpu_info()
    report: dict[str, Any] = {"selection_version": SELECTION_VERSION, "asked": engine, "fidelity_floor": FIDELITY_FLOOR,
                              "argmax_floor": ARGMAX_FLOOR, "margin": MARGIN,
                              "host": {"cpu": cpu.model, "cores": cpu.cores, "isa": list(cpu.isa)},
                              "candidates": [{"engine": "torch", "precision": torch_precision}]}
    if engine == "torch":
        return {**report, "engine": "torch", "why": "asked for (--chat-engine torch)"}
    if llamacpp.bindings_version() is None:
        if engine == "auto":
            return {**report, "engine": "torch",
                    "why": "llama-cpp-python is not installed (`make llamacpp` builds it, ~6 min once; then re-export)"}
        llamacpp.ensure_bindings(log)
    from vlmserve.model_repository.llamacpp_engine import LlamaCppLoop

    outtypes = ["f32", "bf16"] if cpu.has_bf16 else ["f32"]
    prompts = chat_prompts(family.tokenizer, USERS)
    makers: dict[str, Callable[[], Any]] = {
        "torch": lambda: _torch_loop(family)}
    ggufs: dict[str, Path] = {}
    for outtype in outtypes:
        gguf = llamacpp.ensure_gguf(source_dir, outtype, log, out=out_dir / f"gguf-{outtype}")
        trial = {"engine": "llamacpp", "precision": outtype, "gguf": gguf.stat().st_size,
                 **fence_gguf(model, prompts[:4], gguf)}
        report["candidates"].append(trial)
        if trial["min_cosine"] >= FIDELITY_FLOOR and trial["argmax_agreement"] >= ARGMAX_FLOOR:
            ggufs[f"llamacpp-{outtype}"] = gguf
            makers[f"llamacpp-{outtype}"] = _llama_maker(LlamaCppLoop, family, gguf)
    timings = time_loops(makers, prompts)
    for trial in report["candidates"]:
        name = trial["engine"] if trial["engine"] == "torch" else f"llamacpp-{trial['precision']}"
        trial.update(timings.get(name, {}))
    torch_speed = timings["torch"]["tokens_per_s"]
    best = max(ggufs, key=lambda n: timings[n]["tokens_per_s"], default=None)
    if best is None:
        return {**report, "engine": "torch", "why": "no GGUF holds the logit fence"}
    speed = timings[best]["tokens_per_s"]
    if engine == "auto" and speed < torch_speed * MARGIN:
        return {**report, "engine": "torch",
                "why": f"llama.cpp {speed:.1f} tok/s is not {MARGIN}x the torch loop's {torch_speed:.1f}"}
    return {**report, "engine": "llamacpp", "precision": best.removeprefix("llamacpp-"),
            "gguf": str(ggufs[best].relative_to(out_dir)),
            "why": f"llama.cpp {speed:.1f} tok/s vs the torch loop's {torch_speed:.1f} at {USERS} rows"
                   + (" (asked for)" if engine == "llamacpp" else "")}


def _llama_maker(loop_class, family, gguf: Path) -> Callable[[], Any]:
    return lambda: loop_class(family, gguf, max_batch=USERS, max_batch_tokens=4096, prefix_cache_bytes=0)


def _torch_loop(family):
    from vlmserve.model_repository.chat_engine import DecodeLoop

    return DecodeLoop(family, max_batch=USERS, prefix_cache_bytes=0)


def summary(report: dict[str, Any]) -> str:
    return f"{report['engine']}: {report['why']}"
