"""DeepSeek-OCR slot: loads the checkpoint with its own remote code and answers OCR requests one by one.

NOT VERIFIED HERE: the weights cannot be downloaded on the build machines and the remote code targets CUDA,
so this path has never run. It is the documented loading recipe (``AutoModel`` with ``trust_remote_code`` and
the model's ``infer`` method), wired into the same chat engine interface so the gateway can route to it.
It is not a ``chat_engine.DecoderFamily``: ``infer`` runs a whole generation per call and exposes no forward to
step with a KV cache, so it stays on the engine's static path (``run_batch``, one job after another).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from vlmserve.model_repository import common
from vlmserve.model_repository.chat_engine import ChatJob


class DeepSeekOcrPipeline:
    def __init__(self, checkpoint_dir, device: str = "cpu", attn_implementation: str = "sdpa", encoder=None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if device != "cuda":
            raise RuntimeError("DeepSeek-OCR's remote code needs a CUDA GPU; export it with --device cuda")
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), trust_remote_code=True)
        self.model = AutoModel.from_pretrained(
            str(checkpoint_dir), trust_remote_code=True, use_safetensors=True, _attn_implementation=attn_implementation
        ).eval().to(device).to(torch.bfloat16)

    def prepare(self, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
        images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
        if len(images) != 1:
            raise common.InputError("DeepSeek-OCR takes exactly one image per request")
        text = " ".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text").strip()
        return {"image": images[0], "prompt": "<image>\n" + (text or "Free OCR.")}, 0

    def run_batch(self, jobs: list[ChatJob]) -> None:
        # The remote ``infer`` takes one image file at a time; there is no batched entry point to call.
        for job in jobs:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "image.png"
                job.inputs["image"].save(path)
                text = self.model.infer(self.tokenizer, prompt=job.inputs["prompt"], image_file=str(path),
                                        output_path=tmp, base_size=1024, image_size=640, crop_mode=True,
                                        save_results=False, eval_mode=True) or ""
            text = str(text)
            job.finish = "stop"
            job.emit(text, "", None)
            job.emit("", "stop", {"prompt_tokens": 0, "completion_tokens": len(self.tokenizer(text)["input_ids"]),
                                  "batch_size": 1})
