"""The end-to-end fence for a chat model's vision tower: what the user gets is the language model's answer.

SmolVLM2's vision encoder + connector (``smolvlm2_vision``) produces features nobody sees: the language model reads
them. A tower cosine of 0.999 says little about whether the answer changes, so export fences each candidate
runtime/precision of that tower by the language model's logits instead. For a few realistic photos
(:func:`vlmserve.export.photos.photos`), the serving pipeline's own prompt
(:class:`vlmserve.model_repository.smolvlm.SmolVLMPipeline`:
chat template, image-token layout, tiles, the features spliced into the embeddings) is followed by a fixed answer,
and the fp32 decoder runs once over prompt + answer (teacher forcing) with the features of the fp32 PyTorch tower
and once with the candidate's. The logits at the positions that predict the answer tokens (the first of them is
the last prompt position: the first token the user gets) are compared: minimum and mean cosine and the share of
positions whose argmax (the greedy token) agrees (:func:`vlmserve.export.runtime_choice.logit_fidelity`). The decoder
stays
fp32 here so that only the tower's precision is measured; the decoder's own precision has its own fence
(``decoder_choice.json``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from vlmserve.export import photos, runtime_choice

PHOTOS = 3
QUESTION = "Describe this image."


def answer_text(index: int) -> str:
    """The fixed answer the decoder is teacher-forced on after the ``index``-th photo."""
    return f"This is {photos.SENTENCES[index % len(photos.SENTENCES)]}."


def torch_encoder(vision):
    """The fp32 PyTorch tower (``vlmserve.model_repository.smolvlm.vision_module``) as an encoder callable (feeds ->
    outputs),
    the shape of what ``open_encoder`` returns."""
    import torch

    def encode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = vision(torch.from_numpy(feeds["pixel_values"]), torch.from_numpy(feeds["patch_attention_mask"]))
        return {"image_features": out.numpy()}

    return encode


class SmolVLMImageFence:
    """``fence(encoder)`` -> the :func:`~vlmserve.export.runtime_choice.logit_fidelity` figures of the language model's
    teacher-forced logits with ``encoder``'s image features vs with the fp32 reference tower's.

    ``reference`` is an encoder callable (feeds -> ``{"image_features": ...}``), normally :func:`torch_encoder` of
    the export's vision module. The reference logits are computed once, here.
    """

    def __init__(self, checkpoint_dir: Path, reference, count: int = PHOTOS, seed: int = 0) -> None:
        from vlmserve.model_repository.common import FeatureCache
        from vlmserve.model_repository.smolvlm import SmolVLMPipeline

        # The served pipeline (fp32 decoder), with its image cache off: every call runs the encoder it is given.
        self.pipeline = SmolVLMPipeline(checkpoint_dir, encoder=reference, decoder_precision="fp32",
                                        image_cache=FeatureCache(0))
        eos = self.pipeline.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        self.prompts: list[tuple[dict[str, Any], int]] = []
        for i, photo in enumerate(photos.photos(count, seed)):
            messages = [{"role": "user", "content": [{"type": "image", "image": photo},
                                                     {"type": "text", "text": QUESTION}]}]
            inputs, prompt_len = self.pipeline.prepare(messages)
            answer = self.pipeline.tokenizer(answer_text(i), add_special_tokens=False)["input_ids"]
            if eos not in (None, self.pipeline.tokenizer.unk_token_id):
                answer = [*answer, eos]
            self.prompts.append(({**inputs, "input_ids": [*inputs["input_ids"], *answer]}, prompt_len))
        self.tiles = sum(len(p["pixel_values"]) for p, _ in self.prompts)
        self.reference = self.logits(reference)
        positions = sum(len(x) for x in self.reference)
        self.description = (f"teacher-forced logits of the fp32 decoder over {count} photo prompts "
                            f"({self.tiles} tiles; prompt + a fixed answer, {positions} answer positions) with "
                            "the candidate's image features vs the fp32 PyTorch tower's")

    def logits(self, encoder) -> list[Any]:
        """Per prompt: the logits ``[answer positions, vocab]`` with ``encoder``'s image features."""
        import torch

        pipeline = self.pipeline
        pipeline.encoder = encoder
        out = []
        with torch.no_grad():
            for inputs, prompt_len in self.prompts:
                kwargs, _ = pipeline.prefill_inputs(SimpleNamespace(inputs=inputs))  # type: ignore[arg-type]
                hidden = pipeline.model.model(**kwargs).last_hidden_state[0, prompt_len - 1:-1]
                out.append(pipeline.model.lm_head(hidden).float())
        return out

    def __call__(self, encoder) -> dict[str, Any]:
        return runtime_choice.logit_fidelity(self.reference, self.logits(encoder))

