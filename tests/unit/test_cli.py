"""The ``vlmserve`` command line: help lists the verbs; export failures are clear and exit non-zero."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from vlmserve.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    out = runner.invoke(app, ["--help"]).output
    for verb in ("demo", "serve", "export", "start", "stop", "status", "run", "ensure", "clean", "hardware", "plan",
                 "image"):
        assert verb in out


def test_image_build_group_is_reachable_from_vlmserve() -> None:
    # `vlmserve image build` is what the README and docker/README tell users to run.
    out = runner.invoke(app, ["image", "build", "--help"]).output
    assert "--image" in out and "wheelhouse" in out
    bad = runner.invoke(app, ["image", "build", "--image", "tpu"])
    assert bad.exit_code != 0 and "cpu, gpu, rocm" in " ".join(bad.output.split())


def test_export_missing_checkpoint_fails_clearly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--set", "hub", "--model", f"siglip={tmp_path / 'missing'}",
                                 "--family", "siglip",
                                 "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 1
    assert "does not exist" in " ".join(result.output.split())


def test_export_rejects_unknown_device(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--device", "tpu", "--repo", str(tmp_path)])
    assert result.exit_code != 0
