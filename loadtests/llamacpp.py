"""llama.cpp's ``llama-server`` as the chat peer of ``vlmserve bench --llama-cpp``: started and checked.

It is built and the checkpoint converted by ``export/llamacpp.py`` (the same sdist, ISA level and GGUF the chat
engine uses).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmserve.orchestrator.lifetime import die_with_parent

# Tokens of KV per parallel slot: the bench's text prompt (~30 tokens) + max_tokens (64) with room to spare.
CTX_PER_SLOT = 512
# ChatUser's extra body fields for llama-server: no early EOS (random weights: both servers must emit max_tokens
# tokens), and no prompt-prefix reuse between requests (vlmserve prefills every request; the bench repeats one
# prompt, so llama-server's slot cache would skip the prefill that vlmserve does).
REQUEST_EXTRA = {"ignore_eos": True, "cache_prompt": False}


def server_command(binary: Path, gguf: Path, port: int, slots: int, threads: int = 2,
                   ctx_per_slot: int = CTX_PER_SLOT, poll: int | None = None) -> list[str]:
    """``llama-server`` with ``slots`` parallel sequences (continuous batching), ``ctx_per_slot`` tokens of KV
    each, ``threads`` for decoding and for prompt processing."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--cont-batching",
            "--no-webui", "--metrics", *([] if poll is None else ["--poll", str(poll)])]



# ---------------------------------------------------------------------------------------------- running


@dataclass
class LlamaServer:
    proc: subprocess.Popen
    url: str
    command: list[str]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_server(binary: Path, gguf: Path, port: int, slots: int, threads: int, log_file: Path,
                 poll: int | None = None) -> LlamaServer:
    cmd = server_command(binary, gguf, port, slots, threads, poll=poll)
    proc = subprocess.Popen(cmd, stdout=open(log_file, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            preexec_fn=die_with_parent())  # it dies with the bench, however the bench ends
    return LlamaServer(proc, f"http://127.0.0.1:{port}", cmd)


def check_tokenizer(url: str, checkpoint: Path, prompt: str) -> dict[str, Any]:
    """The chat prompt rendered by ``llama-server`` (the GGUF's template) and by the HF tokenizer's template must
    be the same text, tokenize to the same ids (same vocab, merges and pre-tokenizer), and the vocab sizes must be
    equal. Raises otherwise."""
    import httpx
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The messages exactly as ChatUser sends them (content as a list of typed parts).
    applied = httpx.post(f"{url}/apply-template", json={"messages": messages}, timeout=30).json()["prompt"]
    ours = httpx.post(f"{url}/tokenize", json={"content": rendered, "add_special": False, "parse_special": True},
                      timeout=30).json()["tokens"]
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    n_vocab = ((models.get("data") or [{}])[0].get("meta") or {}).get("n_vocab")
    result = {"prompt_tokens": len(hf_ids), "ids_equal": ours == hf_ids, "template_equal": applied == rendered,
              "hf_vocab": len(tokenizer), "gguf_vocab": n_vocab}
    if ours != hf_ids or applied != rendered or n_vocab != len(tokenizer):
        raise RuntimeError(f"llama-server and the HF tokenizer disagree on the chat prompt: {result}; "
                           f"llama-server rendered {applied!r}, HF {rendered!r}")
    return result


def prompt_tokens(url: str, prompt: str, model: str = "smolvlm2") -> int:
    """``usage.prompt_tokens`` of one short chat request with ``prompt``, as the bench sends it (text part)."""
    import httpx

    body = {"model": model, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens"])
