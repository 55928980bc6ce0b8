"""Export stage: checkpoints (Hub, tiny or perf) -> ONNX, parity-checked against PyTorch, runtime chosen per host
-> a Triton model repository whose configs carry the model contract (``vlmserve.families.contract``). Which
families exist and how each is built comes from their specs (``vlmserve.families``)."""
