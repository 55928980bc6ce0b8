"""vlmserve: vision-language models behind one NVIDIA Triton Inference Server.

Layers, bottom to top (``docs/architecture.md``; ``lint-imports`` checks them): the bottom of this package
(``paths``, ``host``, ``families``) imports nothing of ours; ``model_repository`` stands on it; ``gateway`` and
``export`` on those; then ``orchestrator``, ``loadtests``; ``vlmserve.cli`` is the top and nothing imports it.
"""

__version__ = "0.1.0"
