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


def is_tiny(model_dir: Path) -> bool:
    """True when ``model_dir`` was built by this module (random weights)."""
    return (Path(model_dir) / "VLMSERVE_TINY.json").exists()


# Florence-2 adds these as tokens of its BART tokenizer; the post-processor parses them out of the text.
_FLORENCE_TOKENS = (
    [f"<loc_{i}>" for i in range(1000)]
    + ["<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>",
       "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>",
       "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>",
       "<and>"]
)


def _bart_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = BartTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=1024,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_tokens(_FLORENCE_TOKENS)
    return tokenizer


def build_tiny_florence2(out_dir: Path) -> Path:
    """Write a tiny random ``Florence2ForConditionalGeneration`` + ``Florence2Processor`` to ``out_dir``."""
    import torch
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    tokenizer = _bart_tokenizer(400)
    d_model = 32
    image_size = 64
    config = Florence2Config(
        vision_config={
            "depths": [1, 1, 1, 1], "embed_dim": [16, 32, 48, 64], "num_heads": [1, 2, 3, 4],
            "num_groups": [1, 2, 3, 4], "window_size": 2, "projection_dim": d_model, "drop_path_rate": 0.0,
            "max_position_embeddings": 8, "max_temporal_embeddings": 4,
        },
        text_config={
            "vocab_size": len(tokenizer), "d_model": d_model, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64, "max_position_embeddings": 1024, "dropout": 0.0,
        },
        image_token_id=tokenizer.image_token_id,
    )
    model = Florence2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        tokens = model.model.get_image_features(torch.zeros(1, 3, image_size, image_size)).shape[1]
    model.save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size}, do_center_crop=False, crop_size=None,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=tokens,
    )
    from vlmserve.model_repository.florence2_tasks import DEFAULT_POST_PROCESSOR_CONFIG

    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                       post_processor_config=DEFAULT_POST_PROCESSOR_CONFIG).save_pretrained(out_dir)
    (out_dir / "VLMSERVE_TINY.json").write_text(
        json.dumps({"weights": "random", "seed": TINY_SEED, "architecture": "Florence2ForConditionalGeneration"},
                   indent=2)
    )
    return out_dir




def _byte_bpe(vocab_size: int, specials: list[str]):
    """A byte-level BPE trained on the fixed corpus (Qwen2 / SmolLM style), special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


# Chat templates in the shape of the released ones (ChatML for Qwen2-VL, "User:/Assistant:" for SmolVLM2);
# media parts become the model's placeholder tokens, which the processors expand.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2vl(out_dir: Path) -> Path:
    """Write a tiny random ``Qwen2VLForConditionalGeneration`` + processor to ``out_dir``."""
    import torch
    from transformers import (
        Qwen2TokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=_byte_bpe(400, specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=4096, chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}, "tie_word_embeddings": True,
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Small images -> few visual tokens (each 28x28 px becomes one token after the 2x2 merge).
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(out_dir)
    (out_dir / "VLMSERVE_TINY.json").write_text(
        json.dumps({"weights": "random", "seed": TINY_SEED, "architecture": "Qwen2VLForConditionalGeneration"},
                   indent=2)
    )
    return out_dir




SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_smolvlm2(out_dir: Path) -> Path:
    """Write a tiny random ``SmolVLMForConditionalGeneration`` + tokenizer + image processor to ``out_dir``."""
    import torch
    from transformers import GPT2TokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                "<global-img>", *grid]
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=_byte_bpe(400, specials), eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", unk_token="<|endoftext|>", model_max_length=8192,
        chat_template=SMOLVLM_CHAT_TEMPLATE, extra_special_tokens={"image_token": "<image>"},
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 8192, "pad_token_id": pad_id, "eos_token_id": eos_id},
        scale_factor=2, image_token_id=image_token_id, pad_token_id=pad_id,
    )
    model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    SmolVLMImageProcessor(do_image_splitting=True, size={"longest_edge": 128},
                          max_image_size={"longest_edge": 64}).save_pretrained(out_dir)
    (out_dir / "VLMSERVE_TINY.json").write_text(
        json.dumps({"weights": "random", "seed": TINY_SEED, "architecture": "SmolVLMForConditionalGeneration"},
                   indent=2)
    )
    return out_dir


