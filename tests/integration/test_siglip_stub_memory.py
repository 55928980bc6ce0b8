"""The SigLIP (v1 and 2) client models' Triton Python stubs stay torch-free (and so ~360 MiB lighter each).

Each Python-backend model instance is its own ``triton_python_backend_stub`` process; a stub that imports
transformers' image processor or tokenizer maps libtorch as well, which costs hundreds of MiB of RSS per instance.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.integration

CLIENTS = ("siglip_embed_image", "siglip_embed_text", "siglip2_embed_image", "siglip2_embed_text")
MODELS = (*CLIENTS, "siglip_vision")


def stub_processes(repository: Path, model: str) -> list[psutil.Process]:
    """The stub processes serving ``model`` from ``repository``: a stub's command line starts with the path of the
    model's ``model.py``. Matching the repository too keeps out other Triton servers running on this machine."""
    folder = str(repository.resolve() / model) + "/"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if len(cmdline) > 1 and Path(cmdline[0]).name == "triton_python_backend_stub" and \
                str(Path(cmdline[1]).resolve()).startswith(folder):
            found.append(proc)
    return found


def mapped_libraries(proc: psutil.Process) -> set[str]:
    return {Path(m.path).name for m in proc.memory_maps(grouped=True) if m.path.startswith("/")}


def test_siglip_stubs_do_not_load_torch(stack, record_property) -> None:
    # One request each, so the preprocessing code paths have run (lazy imports would show up now).
    with httpx.Client(base_url=stack.gateway, timeout=60) as gw:
        image = (stack.image_dir / "red.png").read_bytes()
        uri = "data:image/png;base64," + base64.b64encode(image).decode()
        for family in ("siglip", "siglip2"):
            assert gw.post("/embed_text", json={"text": "a photo of a cat", "model": family}).status_code == 200
            assert gw.post("/embed", json={"images": [uri], "model": family}).status_code == 200
    rss, torch_maps = {}, {}
    for model in MODELS:
        procs = stub_processes(stack.settings.repository, model)
        assert procs, f"no triton_python_backend_stub process found for {model}"
        rss[model] = [round(p.memory_info().rss / 2**20, 1) for p in procs]  # one per instance
        torch_maps[model] = sorted({lib for p in procs for lib in mapped_libraries(p)
                                    if lib.startswith(("libtorch", "libc10"))})
    record_property("stub_rss_mib", rss)
    print(f"stub RSS (MiB): {rss}")
    for model in CLIENTS:
        assert not torch_maps[model], f"{model} stub maps torch: {torch_maps[model]}"
