"""Gateway settings (env prefix ``VLMSERVE_GATEWAY_``); built by the entry point, passed to ``create_app``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlmserve.families.contract import DEFAULT_MAX_PIXELS
from vlmserve.gateway.images import ImagePolicy


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMSERVE_GATEWAY_", extra="ignore")

    backend: str = Field("triton", description="the inference engine behind the gateway "
                         "(vlmserve.gateway.backends.BACKENDS)")
    host: str = "127.0.0.1"
    port: int = 8080
    triton_url: str = Field("127.0.0.1:8000", description="Triton HTTP endpoint, host:port")
    triton_grpc_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint (streaming chat), host:port")
    triton_timeout_s: float = 120.0
    registry_ttl_s: float = 10.0
    triton_reconnect_s: float = Field(0.0, ge=0, description="reopen Triton connections this often (s) so that "
                                      "replicas behind one DNS name share the load (the deploy targets set 30); "
                                      "0 keeps them")
    retry_after_s: int = 5
    drain_delay_s: float = Field(0.0, ge=0, description="on SIGTERM, first answer /readyz 503 and keep serving "
                                 "everything else this long (s), so load balancers stop routing here before new "
                                 "requests are refused (the Swarm and Kubernetes targets set 5)")
    drain_timeout_s: float = Field(15.0, ge=0, description="then wait this long at most for requests in "
                                   "progress (new ones get 503 + Retry-After), then exit")
    api_keys: list[str] = Field(default_factory=list, description="if set, Bearer keys required (JSON list)")
    max_body_bytes: int = 64 * 1024 * 1024
    # In-flight caps per route group (each route names its group: gateway/limits.py inflight_group): beyond them, 429
    # + Retry-After at once.
    max_inflight_embeddings: int = Field(64, ge=1, description="/embed, /embed_text, /v1/embeddings in progress")
    max_inflight_florence: int = Field(32, ge=1, description="/infer, /infer/upload, /v1/predict in progress")
    max_inflight_chat: int = Field(64, ge=1, description="chat completions, /ocr, /v1/ocr, describe_region")
    max_items: int = 32
    max_text_chars: int = 20_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_video_bytes: int = Field(32 * 1024 * 1024, description="cap on one chat video (decoded/downloaded bytes)")
    max_images_per_request: int = Field(8, description="images + videos in one chat request")
    allow_urls: bool = True
    url_allowlist: list[str] = Field(default_factory=list, description="hosts/IPs/CIDRs exempt from SSRF checks")
    local_image_dir: str | None = Field(None, description="local image paths allowed only inside this folder")
    fetch_timeout_s: float = 10.0
    # Object store for Florence-2's /v1/predict store_image=true (the Florence-2 v1 service used MinIO).
    storage_dir: str | None = Field(None, description="local object store folder; default <state dir>/storage")
    public_base_url: str | None = Field(None, description="base of /files URLs; default: the request's base URL")
    storage_s3_bucket: str | None = Field(None, description="when set, store objects in this S3-compatible bucket")
    storage_s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, ...); None = AWS")
    storage_s3_region: str | None = None
    storage_s3_access_key_id: str | None = Field(None, description="None = boto3's default chain (AWS_* env)")
    storage_s3_secret_access_key: SecretStr | None = None
    storage_s3_prefix: str = Field("", description="key prefix inside the bucket, e.g. 'florence/'")
    # Retention of the local store (S3: the bucket's lifecycle rules); swept in the background.
    storage_max_age_s: float | None = Field(7 * 24 * 3600, description="stored images older than this are deleted")
    storage_max_bytes: int | None = Field(1024**3, description="oldest stored images deleted beyond this total")
    storage_sweep_s: float = Field(300, gt=0, description="retention sweep interval")
    # The Batch API (/v1/files, /v1/batches): its state and files, shared by the replicas like the stored images.
    batch_dir: str | None = Field(None, description="batch state and files; default <storage dir>/batches")
    batch_max_file_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest batch input file")
    batch_max_requests: int = Field(50_000, ge=1, description="most request lines in one batch")
    batch_share: float = Field(0.5, gt=0, le=1, description="a batch runs at most this share of its route "
                               "group's in-flight cap at once, below interactive requests")
    batch_yield_s: float = Field(2.0, ge=0, description="while the route group has interactive requests in "
                                 "progress, or had one this recently (s), a batch runs one line at a time")
    batch_lease_s: float = Field(30.0, gt=0, description="a replica's hold on the batch it runs, renewed while it "
                                 "runs; a dead replica's batch is taken over once this runs out")
    batch_poll_s: float = Field(2.0, gt=0, description="how often an idle runner looks for queued batches")
    storage_url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="presigned URL lifetime")

    def inflight_caps(self) -> dict[str, int]:
        return {"embeddings": self.max_inflight_embeddings, "florence": self.max_inflight_florence,
                "chat": self.max_inflight_chat}

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            fetch_timeout_s=self.fetch_timeout_s,
            allow_urls=self.allow_urls,
            url_allowlist=tuple(self.url_allowlist),
            local_dir=self.local_image_dir,
        )
