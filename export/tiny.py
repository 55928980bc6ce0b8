"""Randomly initialised small models of the real architectures, built offline.

They are saved in Hugging Face format (config, weights, tokenizer, image processor) so that everything
downstream loads them with ``from_pretrained`` on a directory, exactly like a real checkpoint.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

TINY_SEED = 1234

# A small, fixed corpus for the SentencePiece tokenizer: enough pieces for a 320-token vocabulary.
_CORPUS = """
a photo of a cat sitting on a red chair
a dog running in the park with a ball
the quick brown fox jumps over the lazy dog
an aerial view of a city at night with bright lights
two people riding bicycles along the river
a bowl of fresh fruit on a wooden kitchen table
a close up of a flower with yellow petals
a train arriving at a busy station in winter
a screenshot of a document with printed text and numbers
a red car parked next to a blue house
mountains covered with snow under a clear sky
a child reading a book in the library
hello world test embedding image text vision language model
green trees, white clouds, black and white photograph, colourful painting
""".strip().splitlines()


def _train_sentencepiece(out_dir: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    # SigLIP's tokenizer expects </s> (eos, also used as pad) and <unk>; no bos.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        pad_piece="<pad>",
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = out_dir / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def build_tiny_siglip(out_dir: Path) -> Path:
    """Write a tiny random ``SiglipModel`` + ``SiglipProcessor`` to ``out_dir`` and return it."""
    import torch
    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    text_len = 16
    config = SiglipConfig(
        text_config={
            "vocab_size": 320,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": text_len,
            "projection_size": 32,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
    )
    model = SiglipModel(config).eval()
    model.save_pretrained(out_dir)

    spm_path = _train_sentencepiece(out_dir, vocab_size=config.text_config.vocab_size)
    tokenizer = SiglipTokenizer(vocab_file=str(spm_path), model_max_length=text_len)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)

    (out_dir / "VLMSERVE_TINY.json").write_text(
        json.dumps({"weights": "random", "seed": TINY_SEED, "architecture": "SiglipModel"}, indent=2)
    )
    return out_dir


TINY_BUILDERS = {"siglip": build_tiny_siglip}


def is_tiny(model_dir: Path) -> bool:
    """True when ``model_dir`` was built by this module (random weights)."""
    return (Path(model_dir) / "VLMSERVE_TINY.json").exists()
