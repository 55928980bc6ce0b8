"""Run by tests/integration/test_client.py under a second interpreter (Debian's pypy3, Python 3.9) in a venv that
holds only vlmserve-client and httpx: every client once against the running stack; prints the results as JSON.

Usage: python client_check.py GATEWAY_URL IMAGE_PATH
"""

import asyncio
import json
import platform
import sys

from vlmserve_client import (
    AsyncEmbeddingsClient,
    AsyncFlorence2Client,
    AsyncOcrClient,
    EmbeddingsClient,
    Florence2Client,
    OcrClient,
    VlmserveBadRequest,
)


def main(gateway: str, image_path: str) -> dict:
    out: dict = {"python": list(sys.version_info[:2]), "implementation": platform.python_implementation()}
    with open(image_path, "rb") as f:
        image = f.read()
    with Florence2Client(gateway) as florence:
        out["florence_ready"] = florence.is_ready()
        detection = florence.run("object_detection", image_path, max_new_tokens=4)
        out["florence"] = {"task": detection.task, "image_size": list(detection.image_size or ()),
                           "objects": len(detection.objects)}
        try:
            florence.run("phrase_grounding", image)
        except VlmserveBadRequest as exc:
            out["florence_error"] = {"status": exc.status_code, "class": type(exc).__name__, "param": exc.param}
    with EmbeddingsClient(gateway) as embeddings:
        out["image_vector"] = embeddings.embed_image(image)
        out["text_vectors"] = embeddings.embed_texts(["a red square", "a red square", "a blue circle"])
    with OcrClient(gateway) as ocr:
        result = ocr.ocr(image, max_tokens=3)
        out["ocr"] = {"model": result.model, "text_type": type(result.text).__name__}
        region = ocr.describe_region(image_path, (4, 4, 40, 30), max_tokens=3)
        out["region"] = {"box": list(region.box), "model": region.model}

    async def run_async() -> dict:
        async with AsyncFlorence2Client(gateway) as florence, AsyncEmbeddingsClient(gateway) as embeddings, \
                AsyncOcrClient(gateway) as ocr:
            caption, vectors, read = await asyncio.gather(florence.run("caption", image, max_new_tokens=3),
                                                          embeddings.embed_texts(["a red square"]),
                                                          ocr.ocr(image, max_tokens=2))
        return {"caption_task": caption.task, "text_vector": vectors[0], "ocr_model": read.model}

    out["async"] = asyncio.run(run_async())
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
