"""An exported ``.onnx`` served by the Python backend (the embedded flavour of an onnxruntime model).

On the NGC image the same directory's ``config.pbtxt`` selects Triton's native onnxruntime backend instead;
inputs, outputs and batching are identical, so a Triton client cannot tell the two apart.
"""

from __future__ import annotations

from typing import Any

from vlmserve.families.contract import ModelParams
from vlmserve.model_repository import common


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = common.model_config(args)
        params = ModelParams.from_config(config)
        self.encoder = common.open_encoder(
            common.version_dir(args) / params.onnx_file, params.runtime, params.precision, common.uses_gpu(args),
            params.intra_op_threads, common.device_id(args), params.gpu_mem_limit,
        )
        declared_in = [i["name"] for i in config["input"]]
        declared_out = [o["name"] for o in config["output"]]
        if sorted(declared_in) != sorted(self.encoder.input_names) or not set(declared_out) <= set(
            self.encoder.output_names
        ):
            raise ValueError(
                f"{config['name']}: config inputs/outputs {declared_in}/{declared_out} do not match the ONNX "
                f"graph {self.encoder.input_names}/{self.encoder.output_names}"
            )
        self.input_names = declared_in
        self.output_names = declared_out

    def execute(self, requests):
        pb = common.pb_utils

        def prepare(request):
            return {n: pb.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}

        def compute(rows):
            out = self.encoder(rows)
            return {n: out[n] for n in self.output_names}

        return common.run_batched(requests, prepare, compute)
