"""Every curl and Python example in the README and docs/ runs as written against the stack (ports mapped to the
test's). Blocks fenced as ```bash or ```python are examples and run; plain ``` blocks are shown, not run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlmserve.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
BLOCKS = [(doc.relative_to(PROJECT_ROOT).as_posix(), kind, code) for doc in DOCS
          for kind, code in re.findall(r"```(bash|python)\n(.*?)```", doc.read_text(), flags=re.S)]


def test_readme_has_examples() -> None:
    readme = [k for doc, k, _ in BLOCKS if doc == "README.md"]
    assert readme.count("bash") >= 4 and readme.count("python") >= 2
    assert {doc for doc, _, _ in BLOCKS} >= {"docs/florence2.md", "docs/chat.md"}


def _localise(code: str, stack) -> str:
    grpc_port = stack.triton_grpc.rsplit(":", 1)[1]
    http_port = stack.triton_http.rsplit(":", 1)[1]
    gateway_port = stack.gateway.rsplit(":", 1)[1]
    return (code.replace("127.0.0.1:8080", f"127.0.0.1:{gateway_port}")
                .replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
                .replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}"))


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{doc}-{i}" for i, (doc, _, _) in enumerate(BLOCKS)])
def test_readme_example_runs(index: int, stack, tmp_path: Path) -> None:
    doc, kind, code = BLOCKS[index]
    code = _localise(code, stack)
    if kind == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = tmp_path / "example.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{doc} example {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "example printed nothing"
