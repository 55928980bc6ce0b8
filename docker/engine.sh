#!/usr/bin/env bash
# Make a Docker Engine and Docker Compose available on this (Debian) machine: install what is missing from
# Debian (docker.io, debootstrap for the offline base image, docker-compose when there is no `docker compose`
# plugin), then start dockerd if it is not answering. Idempotent; used by .ci/run before `make test`.
set -euo pipefail
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  missing+=(docker-compose)
fi
if ((${#missing[@]})); then
  echo "docker engine: installing Debian's ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
if docker info >/dev/null 2>&1; then
  echo "docker engine: running ($(docker info --format '{{.ServerVersion}}'))"
  exit 0
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
