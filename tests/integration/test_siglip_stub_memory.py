"""The SigLIP client models' Triton Python stubs stay torch-free (and so ~360 MiB lighter each).

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

MODELS = ("siglip_embed_image", "siglip_embed_text", "siglip_vision")


def stub_processes(model: str) -> list[psutil.Process]:
    """The stub processes serving ``model``: their command line names the model's folder in the repository."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not cmdline or "triton_python_backend_stub" not in Path(cmdline[0]).name:
            continue
        if any(f"/{model}/" in arg or arg.endswith(f"/{model}") for arg in cmdline[1:]):
            found.append(proc)
    return found


def mapped_libraries(proc: psutil.Process) -> set[str]:
    return {Path(m.path).name for m in proc.memory_maps(grouped=True) if m.path.startswith("/")}


def test_siglip_stubs_do_not_load_torch(stack, record_property) -> None:
    # One request each, so the preprocessing code paths have run (lazy imports would show up now).
    with httpx.Client(base_url=stack.gateway, timeout=60) as gw:
        assert gw.post("/embed_text", json={"text": "a photo of a cat"}).status_code == 200
        image = (stack.image_dir / "red.png").read_bytes()
        uri = "data:image/png;base64," + base64.b64encode(image).decode()
        assert gw.post("/embed", json={"images": [uri]}).status_code == 200
    rss, torch_maps = {}, {}
    for model in MODELS:
        procs = stub_processes(model)
        assert procs, f"no triton_python_backend_stub process found for {model}"
        rss[model] = [round(p.memory_info().rss / 2**20, 1) for p in procs]
        torch_maps[model] = sorted(lib for lib in mapped_libraries(procs[0]) if lib.startswith(("libtorch", "libc10")))
    record_property("stub_rss_mib", rss)
    print(f"stub RSS (MiB): {rss}")
    for model in ("siglip_embed_image", "siglip_embed_text"):
        assert not torch_maps[model], f"{model} stub maps torch: {torch_maps[model]}"
