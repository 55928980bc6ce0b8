"""The bash examples in docs/ui.md run as written against the stack (the gateway port mapped to the test's)."""

from __future__ import annotations

import re
import subprocess

import pytest

from vlmserve.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

BLOCKS = re.findall(r"```bash\n(.*?)```", (PROJECT_ROOT / "docs" / "ui.md").read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_ui_doc_example_runs(index: int, stack) -> None:
    port = stack.gateway.rsplit(":", 1)[1]
    code = BLOCKS[index].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"docs/ui.md example {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "example printed nothing"


def test_redirect_example_shows_the_redirect_and_the_json(stack) -> None:
    port = stack.gateway.rsplit(":", 1)[1]
    code = BLOCKS[1].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert f"307 http://127.0.0.1:{port}/ui" in out
    assert '"type":"not_found_error"' in out and out.rstrip().endswith("404")
