#!/usr/bin/env bash
# A second interpreter for the client's tests: Debian's pypy3 (PyPy 7.3, implements Python 3.9, the oldest version
# vlmserve-client claims) with its venv module. Idempotent; used by .ci/run before `make test`
# (tests/integration/test_client.py installs the client into a pypy3 venv and runs it against the stack).
set -euo pipefail
if command -v pypy3 >/dev/null 2>&1 && pypy3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  echo "pypy3: $(pypy3 -c 'import sys; print(sys.version.split()[0], sys.implementation.name)')"
  exit 0
fi
echo "pypy3: installing Debian's pypy3 and pypy3-venv"
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q pypy3 pypy3-venv >/dev/null
echo "pypy3: $(pypy3 -c 'import sys; print(sys.version.split()[0], sys.implementation.name)')"
