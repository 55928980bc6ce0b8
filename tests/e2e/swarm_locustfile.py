"""Locust load for the Swarm e2e (tests/e2e/test_swarm.py): text embeddings through the load balancer.

Every answer is recorded (time, status, Retry-After, start of the body) into $VLMSERVE_SWARM_RECORDS when Locust
quits, so the test can tell clean refusals (429/503 with Retry-After) from lost requests. A refused client waits
what Retry-After says (capped at 2 s), as a well-behaved client does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gevent
from locust import HttpUser, constant, events, task

RECORDS: list[tuple[float, int, str | None, str]] = []


class EmbedTextUser(HttpUser):
    wait_time = constant(0.05)

    @task
    def embed_text(self) -> None:
        body = {"texts": [f"a photo of cat number {len(RECORDS) % 97}"]}
        with self.client.post("/embed_text", json=body, name="/embed_text", timeout=60,
                              catch_response=True) as resp:
            retry_after = resp.headers.get("Retry-After") if resp.headers is not None else None
            RECORDS.append((time.time(), resp.status_code, retry_after,
                            "" if resp.status_code == 200 else (resp.text or str(resp.error))[:200]))
            if resp.status_code == 200:
                resp.success()
                return
            resp.failure(f"HTTP {resp.status_code}")
        if retry_after:
            gevent.sleep(min(float(retry_after), 2.0))


@events.quitting.add_listener
def _write_records(environment, **_kwargs) -> None:
    Path(os.environ["VLMSERVE_SWARM_RECORDS"]).write_text(json.dumps(RECORDS))
