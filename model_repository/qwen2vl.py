"""Qwen2-VL's chat pipeline (family ``qwen2vl``): a ``DecoderFamily`` of the chat engine."""

from __future__ import annotations

from typing import Any

from model_repository import runtime
from model_repository.chat_engine import ChatJob, render_prompt


class QwenPipeline:
    """Qwen2-VL: chat template -> image placeholders expanded per image grid; a ``DecoderFamily`` of the engine.

    The vision tower stays in torch (its patch loops are data dependent, docs/platform.md).
    """

    def __init__(self, checkpoint_dir, device: str = "cpu", attn_implementation: str = "sdpa", encoder=None) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        self.image_processor = Qwen2VLImageProcessor.from_pretrained(str(checkpoint_dir))
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            str(checkpoint_dir), attn_implementation=attn_implementation
        ).eval().to(device)
        self.merge = self.image_processor.merge_size
        # Prompt (image tokens included) + answer must fit the text model's positions (chat.fit_context).
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "text_config", cfg).max_position_embeddings)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}

    def prepare(self, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
        prompt, images = render_prompt(self.tokenizer, messages)
        inputs: dict[str, Any] = {}
        if images:
            # channels_last: the images are RGB PIL images; left to guess, transformers takes an image 1 or 3
            # pixels high for channels-first and fails ("mean must have 1 elements") or transposes it.
            vision = self.image_processor(images=images, return_tensors="pt", input_data_format="channels_last")
            counts = (vision["image_grid_thw"].prod(-1) // (self.merge**2)).tolist()
            pieces = prompt.split("<|image_pad|>")
            if len(pieces) - 1 != len(counts):
                raise runtime.InputError("the chat template did not place every image")
            prompt = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:],
                                                                                       strict=True))
            inputs = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, **inputs}, len(ids)

    def prefill_inputs(self, job: ChatJob) -> tuple[dict[str, Any], int]:
        torch = self.torch
        ids = torch.tensor([job.inputs["input_ids"]], device=self.device)
        mask = torch.ones_like(ids)
        grid = job.inputs.get("image_grid_thw")
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if grid is not None:
            grid = grid.to(self.device)
            kwargs.update(pixel_values=job.inputs["pixel_values"].to(self.device), image_grid_thw=grid)
        # mrope: image tokens share positions, so the text after them continues from the largest one (not from
        # the token count); decode steps go on from there, one per token.
        positions, _ = self.model.model.get_rope_index(ids, grid, None, mask)
        kwargs["position_ids"] = positions
        return kwargs, int(positions.max()) + 1

    def decode_positions(self, positions):
        return positions.view(1, -1, 1).expand(3, -1, -1)
