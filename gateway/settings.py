"""Gateway settings (env prefix ``VLMSERVE_GATEWAY_``); built by the entry point, passed to ``create_app``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.images import ImagePolicy


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMSERVE_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    triton_url: str = Field("127.0.0.1:8000", description="Triton HTTP endpoint, host:port")
    triton_timeout_s: float = 120.0
    registry_ttl_s: float = 10.0
    retry_after_s: int = 5
    api_keys: list[str] = Field(default_factory=list, description="if set, Bearer keys required (JSON list)")
    max_body_bytes: int = 64 * 1024 * 1024
    max_items: int = 32
    max_text_chars: int = 20_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allow_urls: bool = True
    url_allowlist: list[str] = Field(default_factory=list, description="hosts/IPs/CIDRs exempt from SSRF checks")
    local_image_dir: str | None = Field(None, description="local image paths allowed only inside this folder")
    fetch_timeout_s: float = 10.0

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            fetch_timeout_s=self.fetch_timeout_s,
            allow_urls=self.allow_urls,
            url_allowlist=tuple(self.url_allowlist),
            local_dir=self.local_image_dir,
        )
