"""Orchestrator settings (env prefix ``VLMSERVE_``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlmserve import paths

# Deprecated environment names and what replaced them (still read; the commands warn).
DEPRECATED_ENV = {"VLMSERVE_RUNTIME": "VLMSERVE_LAUNCHER"}


def deprecated_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One warning per deprecated variable set in ``environ``."""
    return [f"{old} is deprecated: set {new} instead" + (f" ({new} wins)" if new in environ else "")
            for old, new in DEPRECATED_ENV.items() if old in environ]


class OrchestratorSettings(BaseSettings):
    # populate_by_name: ``OrchestratorSettings(launcher=...)`` beside the launcher's environment names.
    model_config = SettingsConfigDict(env_prefix="VLMSERVE_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    model_set: str = Field("tiny", description="tiny (offline random models) or hub (real checkpoints)")
    repository: Path | None = Field(None, description="model repository; default <state>/repository/<set>")
    model_config_name: str | None = Field(
        "embedded", description="tritonserver --model-config-name (None: the native config.pbtxt files)"
    )
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry collector (OTLP/HTTP), e.g. http://otel-collector:4318: Triton traces every "
        "request (its OpenTelemetry mode), the gateway and the Python models export their spans; unset: off")
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0
    state_dir: Path = Field(default_factory=paths.state_dir)

    # Which launcher `up`/`ensure`/`restart` use (a key of orchestrator/launchers LAUNCHERS, checked by the commands),
    # and what they run on. VLMSERVE_RUNTIME is its deprecated name, read when VLMSERVE_LAUNCHER is not set.
    launcher: str = Field("process", validation_alias=AliasChoices("VLMSERVE_LAUNCHER", *DEPRECATED_ENV),
                          description="what starts the services: a name in LAUNCHERS (orchestrator/launchers)")
    accelerator: Literal["auto", "cpu", "cuda", "rocm"] = "auto"
    fallback: bool = Field(False, description="fall back to CPU (with a warning) when the accelerator is absent")
    gpu_plan: Path | None = Field(None, description="GPU memory plan (YAML/JSON): docker/gpu-plan.example.yaml")

    # Supervision (both launchers): restart a crashed service with exponential backoff.
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    max_restarts: int = Field(5, description="consecutive failed restarts before giving up (0: never restart)")

    # Docker launcher.
    project: str = Field("vlmserve", description="container/network name prefix and label value")
    image: str | None = Field(None, description="image to run; default vlmserve:<cpu|gpu|rocm>")
    hf_cache_volume: str = Field("vlmserve-hf-cache", description="Docker volume mounted as the HF cache")
    shm_size: str = "1g"
    cache_dir: Path = Field(default_factory=paths.cache_dir, description="wheelhouse and base-image cache")

    @model_validator(mode="after")
    def _distinct_ports(self) -> OrchestratorSettings:
        # Triton refuses to start when two of its listeners share a port (and prints its whole usage text).
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        if self.gateway_host == self.host:
            ports["gateway_port"] = self.gateway_port
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both {port}: each service needs its own port")
            seen[port] = name
        return self

    @property
    def repository_path(self) -> Path:
        return (self.repository or self.state_dir / "repository" / self.model_set).resolve()

    @property
    def run_path(self) -> Path:
        return self.state_dir / "run"

    @property
    def triton_http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"
