#!/usr/bin/env bash
# Make a Docker Engine available on this (Debian) machine: install Debian's docker.io if dockerd is missing,
# start dockerd if it is not answering. Idempotent; used by .ci/run before `make test`.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  echo "docker engine: running ($(docker info --format '{{.ServerVersion}}'))"
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker engine: installing Debian's docker.io (+ debootstrap for the offline base image)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
fi
echo "docker engine: starting dockerd (log: /var/log/vlmserve-dockerd.log)"
nohup dockerd >/var/log/vlmserve-dockerd.log 2>&1 &
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && { echo "docker engine: up"; exit 0; }
  sleep 1
done
echo "docker engine: dockerd did not answer within 60 s; last log lines:" >&2
tail -n 20 /var/log/vlmserve-dockerd.log >&2
exit 1
