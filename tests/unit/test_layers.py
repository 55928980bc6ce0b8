"""The layout holds: the import layers stated in pyproject.toml ([tool.importlinter]), and one ``vlmserve`` namespace
in what the installer puts into site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "export", "orchestrator", "model_repository", "loadtests")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"Contracts: {len(contracts)} kept, 0 broken" in result.stdout
    assert {"acyclic_siblings", "layers"} <= {c["type"] for c in contracts}


def test_an_upward_import_or_a_circle_breaks_a_contract(tmp_path: Path) -> None:
    """The contracts can fail: a copy of the tree where the orchestrator imports the CLI (an arrow up) and the
    deploy commands import the orchestrator's commands (a circle) is refused, naming both."""
    copy = tmp_path / "tree"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copytree(ROOT / "vlmserve", copy / "vlmserve", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", *PACKAGES))
    for name in PACKAGES:
        shutil.copytree(ROOT / name, copy / "vlmserve" / name, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "vlmserve" / "orchestrator" / "triton.py").open("a") as f:
        f.write("\nimport vlmserve.cli  # noqa\n")
    with (copy / "vlmserve" / "orchestrator" / "deploy" / "cli.py").open("a") as f:
        f.write("\nimport vlmserve.orchestrator.cli  # noqa\n")
    result = subprocess.run([Path(sys.executable).with_name("lint-imports"), "--no-cache"], cwd=copy,
                            capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(copy)})
    assert result.returncode != 0
    assert "vlmserve.orchestrator.triton -> vlmserve.cli" in result.stdout, result.stdout[-3000:]
    assert "No cycles are allowed in vlmserve.orchestrator" in result.stdout, result.stdout[-3000:]


def test_the_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    """What the installer puts into site-packages: ``vlmserve`` (with vlmserve.gateway, .export, ...) and its
    dist-info, no top-level ``gateway``/``export``/... that other distributions also use; the UI's files inside."""
    tree = tmp_path / "tree"  # a copy, so that the build leaves nothing in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree)
    skip = shutil.ignore_patterns("__pycache__", "reports")
    for name in ("vlmserve", *PACKAGES):
        shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("vlmserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"vlmserve", wheel.name.split("-")[0] + "-" +
                                                 wheel.name.split("-")[1] + ".dist-info"}
    for name in PACKAGES:
        assert f"vlmserve/{name}/__init__.py" in names
    assert "vlmserve/orchestrator/container.py" in names and "vlmserve/gateway/__main__.py" in names
    assert any(n.startswith("vlmserve/gateway/ui/static/") for n in names)
