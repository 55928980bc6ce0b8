"""vlmserve: vision-language models behind one NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
