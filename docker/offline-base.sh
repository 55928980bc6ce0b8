#!/usr/bin/env bash
# Create the base image debian:bookworm-slim without a registry: debootstrap a minbase bookworm rootfs and
# `docker import` it. The rootfs tarball is cached, so later runs only re-import (seconds).
#   usage: docker/offline-base.sh [TAG]        (cache: $VLMSERVE_CACHE_DIR, default ~/.cache/vlmserve)
set -euo pipefail
TAG=${1:-debian:bookworm-slim}
CACHE=${VLMSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmserve}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG: present"
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$CACHE/bookworm-minbase.tar" ]; then
  command -v debootstrap >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "base image $TAG: debootstrap --variant=minbase bookworm (about a minute)"
  debootstrap --variant=minbase bookworm "$tmp/rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -n 20 "$tmp/debootstrap.log" >&2; exit 1; }
  tar -C "$tmp/rootfs" -cf "$CACHE/bookworm-minbase.tar.part" .
  mv "$CACHE/bookworm-minbase.tar.part" "$CACHE/bookworm-minbase.tar"
fi
docker import "$CACHE/bookworm-minbase.tar" "$TAG" >/dev/null
echo "base image $TAG: imported from $CACHE/bookworm-minbase.tar"
