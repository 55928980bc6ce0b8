"""Object store for images the gateway keeps (Florence-2's ``/v1/predict`` with ``store_image=true``).

Two kinds, picked by settings: a local folder served by the gateway itself at ``GET /files/{key}`` (the
default, needs nothing), or an S3-compatible bucket (AWS, MinIO, ...) that hands out presigned GET URLs.
Keys are always generated here (``<uuid4 hex>.<ext>``), never taken from a client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlmserve.gateway.settings import GatewaySettings

log = logging.getLogger("vlmserve.gateway")

__all__ = [
    "LocalStore",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "StoredObject",
    "build_store",
    "media_type_for",
]

_MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "bin": "application/octet-stream",
}
# Exactly what new_key() produces: anything else (separators, "..", other names) is not ours.
_KEY_RE = re.compile(r"^[0-9a-f]{32}\.(?:" + "|".join(_MEDIA_TYPES) + r")$")


class StorageError(RuntimeError):
    """The object store could not store or sign an object (message is safe to show a client)."""


@dataclass(frozen=True)
class StoredObject:
    """A stored object: its key and a URL a client can GET it from."""

    key: str
    url: str


class ObjectStore(Protocol):
    """Stores bytes under a new key and returns where a client can fetch them."""

    kind: str

    async def put(self, data: bytes, ext: str, base_url: str) -> StoredObject:
        """Store ``data`` as ``<new key>.<ext>``; ``base_url`` is the gateway's public base (local store)."""
        ...


def media_type_for(key: str) -> str:
    """The media type for a stored key, from its extension."""
    return _MEDIA_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def new_key(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return f"{uuid.uuid4().hex}.{ext if ext in _MEDIA_TYPES else 'bin'}"


def is_valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


class LocalStore:
    """Objects in a local folder, fetched back through the gateway's ``GET /files/{key}``."""

    kind = "local"

    def __init__(self, root: str | Path | None = None, public_base_url: str | None = None,
                 max_age_s: float | None = None, max_total_bytes: int | None = None) -> None:
        self._root = Path(root) if root is not None else None
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.max_age_s = max_age_s
        self.max_total_bytes = max_total_bytes

    @property
    def root(self) -> Path:
        if self._root is None:
            # Resolved on first use, not at import or app creation: VLMSERVE_HOME may be set later (tests, CLI).
            from vlmserve.paths import state_dir

            self._root = state_dir() / "storage"
        return self._root

    async def put(self, data: bytes, ext: str, base_url: str) -> StoredObject:
        key = new_key(ext)
        try:
            await asyncio.to_thread(self._write, key, data)
        except OSError as exc:
            raise StorageError(f"local object store at {self.root} failed ({type(exc).__name__})") from None
        base = self.public_base_url or base_url.rstrip("/")
        return StoredObject(key, f"{base}/files/{key}")

    def _write(self, key: str, data: bytes) -> None:
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent GET never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, root / key)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def sweep(self, now: float | None = None) -> list[str]:
        """Retention: delete stored objects older than ``max_age_s``, then the oldest until the rest fit in
        ``max_total_bytes``. Returns the deleted keys. Only our own keys are touched."""
        root = self.root
        if not root.is_dir():
            return []
        now = time.time() if now is None else now
        objects = []
        for path in root.iterdir():
            try:
                if is_valid_key(path.name) and path.is_file():
                    info = path.stat()
                    objects.append((info.st_mtime, info.st_size, path))
            except OSError:
                continue  # deleted meanwhile
        objects.sort()  # oldest first
        doomed = [o for o in objects if self.max_age_s is not None and now - o[0] > self.max_age_s]
        kept = [o for o in objects if o not in doomed]
        total = sum(size for _, size, _ in kept)
        while self.max_total_bytes is not None and kept and total > self.max_total_bytes:
            oldest = kept.pop(0)
            doomed.append(oldest)
            total -= oldest[1]
        for _, _, path in doomed:
            path.unlink(missing_ok=True)
        return [path.name for _, _, path in doomed]

    def path_for(self, key: str) -> Path | None:
        """The file for ``key`` if it is one of ours and exists; None otherwise (the route answers 404)."""
        if not is_valid_key(key):
            return None
        path = self.root / key
        return path if path.is_file() else None


class S3Store:
    """Objects in an S3-compatible bucket; URLs are presigned GETs valid ``expiry_s`` seconds."""

    kind = "s3"

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None, prefix: str = "",
                 expiry_s: int = 3600) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix
        self.expiry_s = expiry_s
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            # Imported here so a gateway without S3 configured never pays for boto3.
            import boto3
            from botocore.config import Config

            config = Config(
                signature_version="s3v4",
                # MinIO and most self-hosted S3 servers need path-style URLs; AWS picks by itself.
                s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            )
            # None for the credentials means boto3's own chain (AWS_ACCESS_KEY_ID, profiles, instance roles).
            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                aws_access_key_id=self._access_key_id, aws_secret_access_key=self._secret_access_key,
                config=config,
            )
        return self._client

    async def put(self, data: bytes, ext: str, base_url: str) -> StoredObject:
        key = self.prefix + new_key(ext)
        try:
            url = await asyncio.to_thread(self._put_and_sign, key, data, media_type_for(key))
        except Exception as exc:  # noqa: BLE001 - botocore raises many types (ClientError, EndpointConnectionError...)
            detail = _describe(exc)
            raise StorageError(f"S3 bucket {self.bucket!r} failed: {detail}") from None
        return StoredObject(key, url)

    def _put_and_sign(self, key: str, data: bytes, media_type: str) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=media_type)
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry_s,
        ))


def build_store(settings: GatewaySettings) -> LocalStore | S3Store:
    """The store the settings ask for: S3 when ``storage_s3_bucket`` is set, else the local folder."""
    if settings.storage_s3_bucket:
        secret = settings.storage_s3_secret_access_key
        return S3Store(
            settings.storage_s3_bucket,
            endpoint_url=settings.storage_s3_endpoint_url,
            region=settings.storage_s3_region,
            access_key_id=settings.storage_s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            prefix=settings.storage_s3_prefix,
            expiry_s=settings.storage_url_expiry_s,
        )
    return LocalStore(settings.storage_dir, settings.public_base_url, settings.storage_max_age_s,
                      settings.storage_max_bytes)


async def sweep_forever(store: LocalStore, interval_s: float) -> None:
    """The background retention sweep of the local store (S3: use the bucket's lifecycle rules)."""
    while True:
        try:
            removed = await asyncio.to_thread(store.sweep)
            if removed:
                log.info("storage retention removed %d stored image(s)", len(removed))
        except OSError as exc:
            log.warning("storage retention sweep failed (%s)", _describe(exc))
        await asyncio.sleep(interval_s)


def _describe(exc: BaseException) -> str:
    # botocore's ClientError carries the S3 error code; show that rather than a long message.
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return f"{type(exc).__name__} ({code})"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
