"""Locust users for ``vlmserve bench`` (one scenario per run, chosen by env and the user class name).

Kept apart from ``locustfile.py`` (the general suite): the bench needs exactly one request shape per run so
that vlmserve and the baseline see the same load.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time

import numpy as np
from locust import HttpUser, User, constant, task

from export.photos import photo_jpeg as _photo

MODEL = os.environ.get("VLMSERVE_BENCH_MODEL") or None
MAX_NEW_TOKENS = int(os.environ.get("VLMSERVE_BENCH_MAX_NEW_TOKENS", "32"))
TIMING_LOG = os.environ.get("VLMSERVE_BENCH_TIMING_LOG")


IMAGES = [_photo(w, h, i) for i, (w, h) in enumerate([(224, 224), (640, 480), (1024, 768), (800, 600)])]
B64 = [base64.b64encode(i).decode() for i in IMAGES]


class EmbedUser(HttpUser):
    """One image per ``POST /embed`` (seed 004's call), as fast as answers come back."""

    wait_time = constant(0)

    @task
    def embed(self) -> None:
        body: dict = {"images": ["data:image/jpeg;base64," + random.choice(B64)]}
        if MODEL:
            body["model"] = MODEL
        with self.client.post("/embed", json=body, name="embed image", catch_response=True) as r:
            if r.status_code != 200 or len(r.json()) != 1:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")


class CaptionUser(HttpUser):
    """Florence-2 ``caption`` through seed 000's ``POST /infer``."""

    wait_time = constant(0)

    @task
    def caption(self) -> None:
        # A data URI: unambiguous for both servers (bare JPEG base64 starts with "/9j/", which looks like a path).
        body = {"image_base64": "data:image/jpeg;base64," + random.choice(B64), "task": "caption",
                "max_new_tokens": MAX_NEW_TOKENS}
        with self.client.post("/infer", json=body, name="caption", catch_response=True) as r:
            if r.status_code != 200 or "text" not in r.json():
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            timing = r.json().get("timing")
            if TIMING_LOG and timing:
                with open(TIMING_LOG, "a") as f:
                    f.write(json.dumps(timing) + "\n")


class DirectEmbedUser(User):
    """The same image embedding straight to Triton (tritonclient HTTP, binary tensors): gateway overhead."""

    wait_time = constant(0)

    def on_start(self) -> None:
        import tritonclient.http as th

        self.th = th
        self.triton = th.InferenceServerClient(self.host.removeprefix("http://"))
        self.model = os.environ.get("VLMSERVE_BENCH_TRITON_MODEL", "siglip_embed_image")

    @task
    def embed(self) -> None:
        item = self.th.InferInput("IMAGE", [1, 1], "BYTES")
        item.set_data_from_numpy(np.array([[random.choice(IMAGES)]], dtype=np.object_))
        start = time.perf_counter()
        exception = None
        try:
            out = self.triton.infer(self.model, [item]).as_numpy("EMBEDDING")
            if out.shape[0] != 1:
                raise ValueError(f"unexpected shape {out.shape}")
        except Exception as exc:  # noqa: BLE001 - any failure is a failed request for Locust
            exception = exc
        self.environment.events.request.fire(
            request_type="triton", name="embed image (direct)", response_time=(time.perf_counter() - start) * 1000,
            response_length=0, exception=exception, context={},
        )
