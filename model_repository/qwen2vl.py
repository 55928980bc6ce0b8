"""Qwen2-VL's chat pipeline (family ``qwen2vl``): a ``DecoderFamily`` of the chat engine."""

from __future__ import annotations

from typing import Any

from vlmserve.families.contract import DEFAULT_IMAGE_CACHE_BYTES
from vlmserve.model_repository import common
from vlmserve.model_repository.chat_engine import ChatJob, render_prompt


class QwenPipeline:
    """Qwen2-VL: chat template -> image placeholders expanded per image grid; a ``DecoderFamily`` of the engine.

    The vision tower stays in torch (its patch loops are data dependent, docs/platform.md).
    """

    def __init__(self, checkpoint_dir, device: str = "cpu", attn_implementation: str = "sdpa", encoder=None,
                 image_cache: common.FeatureCache | None = None) -> None:
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
        self.image_token_id = self.model.config.image_token_id
        # The vision tower's outputs per image (on the host), keyed by a hash of that image's patches and grid.
        self.image_cache = image_cache if image_cache is not None else common.FeatureCache(DEFAULT_IMAGE_CACHE_BYTES)
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
                raise common.InputError("the chat template did not place every image")
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
            # What Qwen2VLModel.forward does with pixel_values, with the image features from the cache or the
            # vision tower (image_features): the text embeddings with the image tokens' rows replaced.
            embeds = self.model.model.get_input_embeddings()(ids)
            features = self.image_features(job.inputs).to(embeds.device, embeds.dtype)
            slots = (ids == self.image_token_id)[..., None].expand_as(embeds)
            if int(slots[..., 0].sum()) != features.shape[0]:
                raise ValueError(f"{int(slots[..., 0].sum())} image tokens in the prompt but {features.shape[0]} "
                                 "image features")
            kwargs = {"inputs_embeds": embeds.masked_scatter(slots, features), "attention_mask": mask}
            grid = grid.to(self.device)
        # mrope: image tokens share positions, so the text after them continues from the largest one (not from
        # the token count); decode steps go on from there, one per token.
        positions, _ = self.model.model.get_rope_index(ids, grid, None, mask)
        kwargs["position_ids"] = positions
        return kwargs, int(positions.max()) + 1

    def image_features(self, inputs: dict[str, Any]):
        """The vision tower's output for every image of the request, concatenated: ``[image tokens, dim]``.

        Images found in :attr:`image_cache` (same patches, same grid: bit for bit) are not encoded again; all the
        others go through the vision tower in one call, and each image's features are cached (a host copy).
        """
        torch = self.torch
        pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        bounds = [0, *torch.cumsum(grid.prod(-1), 0).tolist()]
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        keys = [common.content_key(pixels[a:b].numpy(), grid[i].numpy()) for i, (a, b) in enumerate(spans)]
        found: list[Any] = [self.image_cache.get(key) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            rows = pixels if len(missing) == len(spans) else torch.cat([pixels[slice(*spans[i])] for i in missing])
            encoded = self.model.model.get_image_features(rows.to(self.device), grid[missing].to(self.device))
            for i, features in zip(missing, encoded, strict=True):
                found[i] = features.detach().to("cpu", copy=True)  # its own buffer, on the host
                self.image_cache.put(keys[i], found[i])
        return torch.cat(found)

    def decode_positions(self, positions):
        return positions.view(1, -1, 1).expand(3, -1, -1)
