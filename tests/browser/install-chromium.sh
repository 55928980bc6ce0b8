#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/browser drive it with Playwright for Python through its
# executable; Playwright's own browser download needs the internet and is never used). Idempotent; called by
# .ci/run before `make test`.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium: $(chromium --version 2>/dev/null | head -n 1)"
  exit 0
fi
echo "chromium: installing Debian's chromium"
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
echo "chromium: $(chromium --version 2>/dev/null | head -n 1)"
