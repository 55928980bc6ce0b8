"""Export stage: Hugging Face checkpoints -> ONNX (parity-checked) -> a Triton model repository."""
