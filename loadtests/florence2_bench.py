"""In-process Florence-2 latency check: caption p95 under N users, with and without one heavy request.

``python -m vlmserve.loadtests.florence2_bench --checkpoint DIR [--mode static|engine] [--heavy]``

N closed-loop users (no think time) each send a ``caption`` (``--caption-tokens`` new tokens, the default beams)
on a synthetic photo; with ``--heavy`` one more user keeps one ``more_detailed_caption`` request with 1024 new
tokens and 8 beams in flight (random perf weights never emit EOS early, so each decodes all 1024 steps).

``static`` is the old serving path: one execution thread takes up to 8 queued requests (after a 20 ms window,
like Triton's dynamic batcher) and runs them with ``Florence2Pipeline.run``. ``engine`` is the
:class:`~vlmserve.model_repository.florence2_engine.Florence2Engine` the Triton model now uses. The vision encoder is
the
checkpoint's own torch tower here (the export's ONNX copy computes the same features), so only the checkpoint is
needed (``vlmserve.export.perf.build_perf_florence2`` or ``vlmserve export --set perf``).
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.model_repository.florence2 import Florence2Pipeline, Job
from vlmserve.model_repository.florence2_engine import Florence2Engine


class TorchVision:
    """The checkpoint's vision tower + projector as the pipeline's encoder (``pixel_values`` -> features)."""

    def __init__(self, checkpoint: Path) -> None:
        import torch
        from transformers import Florence2ForConditionalGeneration

        self.torch = torch
        self.model = Florence2ForConditionalGeneration.from_pretrained(str(checkpoint)).eval()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.no_grad():
            features = self.model.model.get_image_features(self.torch.from_numpy(inputs["pixel_values"]))
        return {"image_features": features.numpy()}


class Static:
    """The old path: one thread, a dynamic batch per ``pipeline.run`` (Triton's 20 ms window, 8 at most)."""

    def __init__(self, pipeline: Florence2Pipeline, max_batch: int = 8, window_s: float = 0.02) -> None:
        self.pipeline, self.max_batch, self.window_s = pipeline, max_batch, window_s
        self.queue: queue.Queue[tuple[Job, Any]] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, job: Job, done) -> None:
        self.queue.put((job, done))

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            jobs = [Job(i, j.task, j.prompt, j.image, j.max_new_tokens, j.num_beams) for i, (j, _) in enumerate(batch)]
            results = self.pipeline.run(jobs)
            for i, (_, done) in enumerate(batch):
                done(results[i])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--mode", choices=("static", "engine"), default="engine")
    parser.add_argument("--heavy", action="store_true", help="one 1024-token, 8-beam request always in flight")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load after the warm-up")
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--heavy-tokens", type=int, default=1024)
    parser.add_argument("--heavy-beams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 keeps an oversubscribed host steady")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from vlmserve.export import photos

    pipeline = Florence2Pipeline(args.checkpoint, TorchVision(args.checkpoint))
    images = [photos.photo_jpeg(640, 480, seed) for seed in range(8)]
    server: Any = Static(pipeline) if args.mode == "static" else Florence2Engine(pipeline, max_batch=8)

    def call(task: str, tokens: int, beams: int | None, seed: int) -> float:
        job = pipeline.job(0, images[seed % len(images)], task, None, tokens, beams)
        done = threading.Event()
        started = time.perf_counter()
        server.submit(job, lambda result: done.set())
        done.wait()
        return time.perf_counter() - started

    call("caption", args.caption_tokens, None, 0)  # warm-up
    stop = time.monotonic() + args.duration
    latencies: list[float] = []
    heavy: list[float] = []
    lock = threading.Lock()

    def user(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            seconds = call("caption", args.caption_tokens, None, n + i)
            i += 1
            with lock:
                latencies.append(seconds)

    def heavy_user() -> None:
        while time.monotonic() < stop:
            heavy.append(call("more_detailed_caption", args.heavy_tokens, args.heavy_beams, 7))

    threads = [threading.Thread(target=user, args=(n,), daemon=True) for n in range(args.users)]
    if args.heavy:
        threads.append(threading.Thread(target=heavy_user, daemon=True))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads[:args.users]:
        thread.join()
    wall = time.monotonic() - started
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2) if ordered else float("nan")

    report = {"mode": args.mode, "heavy": args.heavy, "users": args.users, "threads": args.threads,
              "caption_tokens": args.caption_tokens,
              "captions": len(ordered), "wall_s": round(wall, 1),
              "caption_rps": round(len(ordered) / wall, 2), "p50_s": pct(0.5), "p95_s": pct(0.95),
              "max_s": round(ordered[-1], 2) if ordered else None,
              "heavy_done": len(heavy), "heavy_s": [round(h, 1) for h in heavy]}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
