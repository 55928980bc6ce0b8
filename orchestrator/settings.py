"""Orchestrator settings (env prefix ``VLMSERVE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlmserve import paths


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    model_set: str = Field("tiny", description="tiny (offline random models) or hub (real checkpoints)")
    repository: Path | None = Field(None, description="model repository; default <state>/repository/<set>")
    model_config_name: str = "embedded"
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0
    state_dir: Path = Field(default_factory=paths.state_dir)

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
