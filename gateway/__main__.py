"""``python -m vlmserve.gateway``: serve the gateway with uvicorn using ``VLMSERVE_GATEWAY_*`` settings.

SIGTERM (or Ctrl-C) drains first, readiness first: for ``drain_delay_s`` only ``/readyz`` answers 503 (load
balancers stop routing here; what they still send is served), then the app's :class:`vlmserve.gateway.limits.Drain`
answers new requests 503 + Retry-After while those in progress finish, for at most ``drain_timeout_s``; then
uvicorn shuts down. A second signal stops at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from vlmserve import telemetry
from vlmserve.gateway.app import create_app
from vlmserve.gateway.limits import Drain
from vlmserve.gateway.settings import GatewaySettings

log = logging.getLogger("vlmserve.gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float,
                 drain_delay_s: float = 0.0) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.drain_delay_s = drain_delay_s
        self.unready_until: float | None = None
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.unready_until is not None or self.should_exit:
            super().handle_exit(sig, frame)  # second signal: uvicorn's own shutdown now
            return
        # Signal handler context: only set plain attributes; on_tick (in the loop) acts on them.
        self.drain.unready = True
        self.unready_until = time.monotonic() + self.drain_delay_s
        if not self.drain_delay_s:
            self._start_draining()

    def _start_draining(self) -> None:
        self.drain.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.unready_until is not None and self.drain_deadline is None and time.monotonic() >= self.unready_until:
            log.info("stop requested %.0f s ago: draining (new requests get 503)", self.drain_delay_s)
            self._start_draining()
        if self.drain_deadline is not None and not self.should_exit:
            if self.drain.active == 0:
                log.info("drained: no request in progress; stopping")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("drain timeout (%.0f s): stopping with %d request(s) in progress",
                            self.drain_timeout_s, self.drain.active)
                self.should_exit = True
        return await super().on_tick(counter)


def main() -> None:
    settings = GatewaySettings()
    # VLMSERVE_LOG_FORMAT=json: JSON lines (uvicorn's own loggers too), else the plain format.
    json_logs = telemetry.configure_logging("gateway", text_format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    log_config = None if json_logs else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=5, log_config=log_config)
    try:
        DrainingServer(config, app.state.drain, settings.drain_timeout_s, settings.drain_delay_s).run()
    finally:
        telemetry.shutdown()  # the last spans (VLMSERVE_OTLP_ENDPOINT) leave before the process does


if __name__ == "__main__":
    main()
