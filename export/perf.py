"""The ``perf`` model set: the real architectures at their real sizes, with random weights, built offline.

The Hub is unreachable here, so load tests cannot use the released checkpoints. These builders write
checkpoints whose compute cost matches them: ``google/siglip-base-patch16-224``, ``microsoft/Florence-2-base``
(as converted to the transformers-native ``florence-community/Florence-2-base``) and
``HuggingFaceTB/SmolVLM2-256M-Video-Instruct``, with every dimension,
layer count, image size and vocabulary size of the originals. Only the weights (fixed seed) and the tokenizers
(small, trained locally like the ``tiny`` ones) differ, so the outputs mean nothing but the speed is real.

They are saved in Hugging Face format exactly like the ``tiny`` builders, with two markers: ``VLMSERVE_PERF.json``
(what this is) and ``VLMSERVE_TINY.json`` (so every existing check treats the weights as random).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmserve import paths
from vlmserve.export.progress import Progress
from vlmserve.export.tiny import SMOLVLM_CHAT_TEMPLATE, _bart_tokenizer, _byte_bpe, _train_sentencepiece
from vlmserve.families import FamilySpec, families
from vlmserve.families.spec import load

if TYPE_CHECKING:
    from transformers import Florence2Config, SiglipConfig, SmolVLMConfig

PERF_SEED = 1234
PERF_MARKER = "VLMSERVE_PERF.json"

SIGLIP_REFERENCE = "google/siglip-base-patch16-224"
SIGLIP_IMAGE_SIZE = 224
SIGLIP_TEXT_LENGTH = 64
# Only the tokenizer is small (trained on a fixed corpus); the model keeps the real 32000-row embedding.
SIGLIP_TOKENIZER_VOCAB = 320

FLORENCE2_REFERENCE = "microsoft/Florence-2-base"
FLORENCE2_IMAGE_SIZE = 768
# Florence-2-base has 51289 tokens; the native conversion adds <image> and pads the embedding to a multiple
# of 64 (transformers' convert_florence2_original_pytorch_to_hf.py), giving 51328 rows.
FLORENCE2_VOCAB_SIZE = 51328
FLORENCE2_VOCAB_PAD = 64
FLORENCE2_TOKENIZER_VOCAB = 400
SMOLVLM2_REFERENCE = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
SMOLVLM2_VOCAB_SIZE = 49280
SMOLVLM2_IMAGE_SIZE = 512  # one tile; images are rescaled to a 2048 px longest edge and cut into such tiles
SMOLVLM2_LONGEST_EDGE = 2048
# The trained part of the tokenizer (prompts are encoded with it); the rest of the 49280 ids are filler words,
# so that every id a random model samples decodes to text, as with the real tokenizer.
SMOLVLM2_TOKENIZER_TRAINED = 400
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def perf_siglip_config() -> SiglipConfig:
    """``SiglipConfig`` with the dimensions of ``google/siglip-base-patch16-224``."""
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config={
            "vocab_size": 32000,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": SIGLIP_TEXT_LENGTH,
            "projection_size": 768,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        vision_config={
            "image_size": SIGLIP_IMAGE_SIZE,
            "patch_size": 16,
            "num_channels": 3,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
    )


def florence2_vocab_size(tokenizer_len: int) -> int:
    """The real Florence-2-base embedding size, or ``tokenizer_len`` rounded up to 64 if that is larger."""
    padded = -(-tokenizer_len // FLORENCE2_VOCAB_PAD) * FLORENCE2_VOCAB_PAD
    return max(FLORENCE2_VOCAB_SIZE, padded)


def perf_florence2_config(tokenizer_len: int, image_token_id: int) -> Florence2Config:
    """``Florence2Config`` with the dimensions of ``microsoft/Florence-2-base`` (transformers-native layout)."""
    from transformers import Florence2Config

    return Florence2Config(
        vision_config={
            "depths": [1, 1, 9, 1],
            "embed_dim": [128, 256, 512, 1024],
            "num_heads": [4, 8, 16, 32],
            "num_groups": [4, 8, 16, 32],
            "patch_size": [7, 3, 3, 3],
            "patch_stride": [4, 2, 2, 2],
            "patch_padding": [3, 1, 1, 1],
            "patch_prenorm": [False, True, True, True],
            "window_size": 12,
            "mlp_ratio": 4.0,
            "projection_dim": 768,
            "drop_path_rate": 0.1,
            "max_position_embeddings": 50,
            "max_temporal_embeddings": 100,
        },
        text_config={
            "vocab_size": florence2_vocab_size(tokenizer_len),
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
            "max_position_embeddings": 1024,
            "activation_function": "gelu",
            "scale_embedding": False,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
            "forced_eos_token_id": 2,
        },
        image_token_id=image_token_id,
    )


def perf_smolvlm2_config(image_token_id: int, pad_token_id: int, eos_token_id: int) -> SmolVLMConfig:
    """``SmolVLMConfig`` with the dimensions of ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct``: a SigLIP-B/16
    vision tower at 512 px, pixel shuffle by 4 (64 tokens a tile) and a SmolLM2-135M text model."""
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": SMOLVLM2_IMAGE_SIZE,
            "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": SMOLVLM2_VOCAB_SIZE,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "tie_word_embeddings": False,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
        },
        scale_factor=4,
        image_token_id=image_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def _smolvlm2_tokenizer():
    """SmolVLM2's special tokens + a byte-level BPE trained on the fixed corpus, padded with filler words
    (``" w<id>"``, decodable but never produced by encoding) to the real 49280 ids."""
    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                "<global-img>", *grid]
    data = json.loads(_byte_bpe(SMOLVLM2_TOKENIZER_TRAINED, specials).to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), SMOLVLM2_VOCAB_SIZE):
        vocab[f"\u0120w{i}"] = i  # "\u0120" is the byte-level space
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>", bos_token="<|im_start|>", unk_token="<|endoftext|>", model_max_length=8192,
        chat_template=SMOLVLM_CHAT_TEMPLATE, extra_special_tokens={"image_token": "<image>"},
    )
    if len(tokenizer) != SMOLVLM2_VOCAB_SIZE:
        raise RuntimeError(f"perf SmolVLM2 tokenizer has {len(tokenizer)} ids, expected {SMOLVLM2_VOCAB_SIZE}")
    return tokenizer


def _write_markers(out_dir: Path, architecture: str, reference: str, parameters: int) -> None:
    marker: dict[str, Any] = {
        "weights": "random",
        "seed": PERF_SEED,
        "model_set": "perf",
        "architecture": architecture,
        "dimensions_of": reference,
        "parameters": parameters,
    }
    text = json.dumps(marker, indent=2)
    # VLMSERVE_TINY.json too: everything that checks vlmserve.export.tiny.is_tiny() then reports random weights.
    (out_dir / "VLMSERVE_TINY.json").write_text(text)
    (out_dir / PERF_MARKER).write_text(text)  # last: its presence means the build finished


def build_perf_siglip(out_dir: Path) -> Path:
    """Write a random ``SiglipModel`` the size of ``google/siglip-base-patch16-224`` + its processor."""
    import torch
    from transformers import SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(PERF_SEED)
    config = perf_siglip_config()
    model = SiglipModel(config).eval()
    model.save_pretrained(out_dir)
    spm_path = _train_sentencepiece(out_dir, vocab_size=SIGLIP_TOKENIZER_VOCAB)
    tokenizer = SiglipTokenizer(vocab_file=str(spm_path), model_max_length=SIGLIP_TEXT_LENGTH)
    image_processor = SiglipImageProcessor(size={"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    _write_markers(out_dir, "SiglipModel", SIGLIP_REFERENCE, model.num_parameters())
    return out_dir


def build_perf_florence2(out_dir: Path) -> Path:
    """Write a random ``Florence2ForConditionalGeneration`` the size of ``microsoft/Florence-2-base`` + processor."""
    import torch
    from PIL.Image import Resampling
    from transformers import CLIPImageProcessor, Florence2ForConditionalGeneration, Florence2Processor

    from vlmserve.model_repository.florence2_tasks import DEFAULT_POST_PROCESSOR_CONFIG

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(PERF_SEED)
    tokenizer = _bart_tokenizer(FLORENCE2_TOKENIZER_VOCAB)
    config = perf_florence2_config(len(tokenizer), tokenizer.image_token_id)
    model = Florence2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        tokens = model.model.get_image_features(
            torch.zeros(1, 3, FLORENCE2_IMAGE_SIZE, FLORENCE2_IMAGE_SIZE)
        ).shape[1]
    model.save_pretrained(out_dir)
    size = {"height": FLORENCE2_IMAGE_SIZE, "width": FLORENCE2_IMAGE_SIZE}
    image_processor = CLIPImageProcessor(
        size=size, crop_size=size, do_center_crop=False, resample=Resampling.BICUBIC,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, image_seq_length=tokens,
    )
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                       post_processor_config=DEFAULT_POST_PROCESSOR_CONFIG).save_pretrained(out_dir)
    _write_markers(out_dir, "Florence2ForConditionalGeneration", FLORENCE2_REFERENCE, model.num_parameters())
    return out_dir


def build_perf_smolvlm2(out_dir: Path) -> Path:
    """Write a random ``SmolVLMForConditionalGeneration`` the size of SmolVLM2-256M + tokenizer and processor."""
    import torch
    from PIL.Image import Resampling
    from transformers import SmolVLMForConditionalGeneration, SmolVLMImageProcessor

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(PERF_SEED)
    tokenizer = _smolvlm2_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|endoftext|>", "<end_of_utterance>")}
    config = perf_smolvlm2_config(ids["<image>"], ids["<|endoftext|>"], ids["<end_of_utterance>"])
    model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    SmolVLMImageProcessor(
        do_image_splitting=True, size={"longest_edge": SMOLVLM2_LONGEST_EDGE},
        max_image_size={"longest_edge": SMOLVLM2_IMAGE_SIZE}, resample=Resampling.LANCZOS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir)
    _write_markers(out_dir, "SmolVLMForConditionalGeneration", SMOLVLM2_REFERENCE, model.num_parameters())
    return out_dir


def perf_models_dir() -> Path:
    """Where the perf checkpoints are built: ``<state dir>/perf-models``."""
    return paths.state_dir() / "perf-models"


def is_perf(model_dir: Path) -> bool:
    """True when ``model_dir`` is a finished build of this module."""
    return (Path(model_dir) / PERF_MARKER).exists() and (Path(model_dir) / "config.json").exists()


def perf_source(spec: FamilySpec, progress: Progress) -> Path:
    """The perf checkpoint for ``spec``, built on first use (offline, fixed seed; about 1 GB each)."""
    if spec.perf is None:
        have = ", ".join(s.name for s in families().values() if s.perf)
        raise ValueError(f"{spec.name} has no perf model; perf models exist for {have}")
    family = spec.name
    out = perf_models_dir() / family
    if not is_perf(out):
        # Build beside the target and rename, so an interrupted build never looks finished.
        partial = out.with_name(f".{family}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        with progress.step(f"building random {family} checkpoint at real size (perf set)"):
            load(spec.perf)(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out
