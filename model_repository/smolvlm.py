"""SmolVLM2 pieces shared by the export (ONNX vision wrapper) and the Triton model (prompt building, batching)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmserve.families.contract import DEFAULT_IMAGE_CACHE_BYTES
from vlmserve.model_repository import common
from vlmserve.model_repository.chat_engine import ChatJob, render_prompt


def vision_module(model):
    """Vision encoder + connector as one module of ``(pixel_values, patch_attention_mask)``.

    SmolVLM's own embeddings compute position ids in a Python loop over images, which a trace would freeze
    to one batch size; this computes the same ids with tensor ops (bucketize as a comparison count), so the
    ONNX graph keeps a dynamic batch. Parity with ``get_image_features`` is checked at export.
    """
    import torch
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = model.model.vision_model
            self.connector = model.model.connector

        def forward(self, pixel_values, patch_attention_mask):
            emb = self.vision.embeddings
            side = emb.num_patches_per_side
            patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
            mask = patch_attention_mask
            nb_h = mask[:, :, 0].sum(1).to(pixel_values.dtype)[:, None]
            nb_w = mask[:, 0, :].sum(1).to(pixel_values.dtype)[:, None]
            h_idx = torch.arange(mask.shape[1], dtype=pixel_values.dtype, device=pixel_values.device)[None, :]
            w_idx = torch.arange(mask.shape[2], dtype=pixel_values.dtype, device=pixel_values.device)[None, :]
            boundaries = torch.arange(1 / side, 1.0, 1 / side, device=pixel_values.device)
            bucket_h = ((h_idx / nb_h * (1 - 1e-6))[..., None] >= boundaries).sum(-1)
            bucket_w = ((w_idx / nb_w * (1 - 1e-6))[..., None] >= boundaries).sum(-1)
            positions = bucket_h[:, :, None] * side + bucket_w[:, None, :]
            positions = torch.where(mask, positions, torch.zeros_like(positions)).flatten(1)
            hidden = patches + emb.position_embedding(positions)
            attention = _prepare_4d_attention_mask(mask.flatten(1), hidden.dtype)
            hidden = self.vision.encoder(inputs_embeds=hidden, attention_mask=attention).last_hidden_state
            return self.connector(self.vision.post_layernorm(hidden))

    return Vision().eval()


def patch_mask(pixel_attention_mask: np.ndarray, patch: int) -> np.ndarray:
    """Pixel mask [n, H, W] -> patch mask [n, H/p, W/p]: a patch counts when any of its pixels is real."""
    n, h, w = pixel_attention_mask.shape
    return pixel_attention_mask.reshape(n, h // patch, patch, w // patch, patch).any(axis=(2, 4))


def image_prompt(rows: int, cols: int, seq_len: int) -> str:
    """The token layout SmolVLM's processor uses for one image (tiles row by row, then the global view)."""
    tokens = "<image>" * seq_len
    if rows == 0 and cols == 0:
        return f"<fake_token_around_image><global-img>{tokens}<fake_token_around_image>"
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{tokens}"
        text += "\n"
    return text + f"\n<fake_token_around_image><global-img>{tokens}<fake_token_around_image>"


class SmolVLMPipeline:
    """SmolVLM2: ONNX vision encoder per request, its features spliced into the prompt embeddings; a
    ``DecoderFamily`` of the chat engine."""

    def __init__(self, checkpoint_dir, device: str = "cpu", attn_implementation: str = "sdpa", encoder=None,
                 decoder_precision: str = "fp32", image_cache: common.FeatureCache | None = None) -> None:
        import torch
        from transformers import AutoTokenizer, SmolVLMForConditionalGeneration, SmolVLMImageProcessor

        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        self.image_processor = SmolVLMImageProcessor.from_pretrained(str(checkpoint_dir))
        if decoder_precision not in ("fp32", "bf16"):
            raise ValueError(f"decoder_precision must be fp32 or bf16, got {decoder_precision!r}")
        dtype = torch.bfloat16 if decoder_precision == "bf16" and device == "cpu" else torch.float32
        self.model = SmolVLMForConditionalGeneration.from_pretrained(
            str(checkpoint_dir), attn_implementation=attn_implementation, dtype=dtype
        ).eval().to(device)
        if encoder is None:
            raise ValueError("SmolVLMPipeline needs the vision encoder (ONNX runner)")
        self.encoder = encoder
        # The encoder's outputs per image, keyed by a hash of that image's exact tiles and patch mask.
        self.image_cache = image_cache if image_cache is not None else common.FeatureCache(DEFAULT_IMAGE_CACHE_BYTES)
        # The vision tower runs as the exported ONNX model; drop the torch copy to save memory.
        self.model.model.vision_model = torch.nn.Identity()
        cfg = self.model.config
        self.patch = cfg.vision_config.patch_size
        self.seq_len = (cfg.vision_config.image_size // self.patch) ** 2 // (cfg.scale_factor**2)
        self.image_token_id = cfg.image_token_id
        # Prompt (image tokens included) + answer must fit the text model's positions (chat.fit_context).
        self.context_length = int(cfg.text_config.max_position_embeddings)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        end_of_utterance = self.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        if end_of_utterance not in (None, self.tokenizer.unk_token_id):
            self.eos_ids.add(end_of_utterance)

    def prepare(self, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
        prompt, images = render_prompt(self.tokenizer, messages)
        inputs: dict[str, Any] = {}
        if images:
            # channels_last: RGB PIL images; transformers would guess an image 1 or 3 pixels high is channels-first.
            vision = self.image_processor(images=[images], return_row_col_info=True, return_tensors="np",
                                          input_data_format="channels_last")
            pieces = prompt.split("<image>")
            if len(pieces) - 1 != len(images):
                raise common.InputError("the chat template did not place every image")
            expanded = [image_prompt(r, c, self.seq_len) for r, c in zip(vision["rows"][0], vision["cols"][0],
                                                                          strict=True)]
            prompt = pieces[0] + "".join(e + rest for e, rest in zip(expanded, pieces[1:], strict=True))
            pixels = vision["pixel_values"][0].astype(np.float32)
            # Tiles per image, in order: rows x cols (none when the image was not split) + the global view.
            tiles = [int(r) * int(c) + 1 for r, c in zip(vision["rows"][0], vision["cols"][0], strict=True)]
            if sum(tiles) != len(pixels):  # not the processor's usual layout: the request's tiles as one entry
                tiles = [len(pixels)]
            inputs = {"pixel_values": pixels,
                      "patch_attention_mask": patch_mask(vision["pixel_attention_mask"][0].astype(bool), self.patch),
                      "image_tiles": tiles}
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, **inputs}, len(ids)

    def prefill_inputs(self, job: ChatJob) -> tuple[dict[str, Any], int]:
        torch = self.torch
        ids = torch.tensor(job.inputs["input_ids"], device=self.device)
        vectors = self.model.get_input_embeddings()(ids)
        if "pixel_values" in job.inputs:
            features = torch.from_numpy(self.image_features(job.inputs)).to(self.device, vectors.dtype)
            tiles = features.reshape(-1, vectors.shape[-1])
            slots = ids == self.image_token_id
            if int(slots.sum()) != tiles.shape[0]:
                raise ValueError(f"{int(slots.sum())} image tokens in the prompt but {tiles.shape[0]} image features")
            vectors = vectors.masked_scatter(slots[:, None].expand_as(vectors), tiles)
        n = len(ids)
        kwargs = {"inputs_embeds": vectors[None],
                  "attention_mask": torch.ones((1, n), dtype=torch.long, device=self.device),
                  "position_ids": torch.arange(n, device=self.device)[None]}
        return kwargs, n

    def image_features(self, inputs: dict[str, Any]) -> np.ndarray:
        """The encoder's output for every tile of the request, ``[tiles, seq_len, dim]``.

        Images found in :attr:`image_cache` (same tiles, same mask: bit for bit) are not encoded again; the tiles of
        all the others go through the encoder as one batch, and each image's slice of the output is cached.
        """
        pixels, mask = inputs["pixel_values"], inputs["patch_attention_mask"]
        bounds = np.cumsum([0, *inputs.get("image_tiles", [len(pixels)])])
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        keys = [common.content_key(pixels[a:b], mask[a:b]) for a, b in spans]
        found: list[Any] = [self.image_cache.get(key) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            rows = np.concatenate([np.arange(*spans[i]) for i in missing])
            feeds = ({"pixel_values": pixels, "patch_attention_mask": mask} if len(rows) == len(pixels) else
                     {"pixel_values": pixels[rows], "patch_attention_mask": mask[rows]})
            out = self.encoder(feeds)["image_features"]
            start = 0
            for i in missing:
                n = spans[i][1] - spans[i][0]
                features = out[start:start + n].copy()  # its own buffer: the cache counts exactly what it holds
                features.flags.writeable = False
                start += n
                found[i] = features
                self.image_cache.put(keys[i], features)
        return np.concatenate(found)

    def decode_positions(self, positions):
        return positions[:, None]
