"""Code of vlmserve's Triton Python models.

The generated model repository (written by ``export``) holds, per model, a ``config.pbtxt`` (native NGC
flavour), ``configs/embedded.pbtxt`` (the ``nvidia-pytriton`` server, Python backend only), the ``.onnx``
files and a two-line ``1/model.py`` that imports its ``TritonPythonModel`` from here. Keeping the logic in
this package gives one code path whichever flavour runs it, and lets unit tests import it without Triton.
"""
