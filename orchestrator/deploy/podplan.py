"""Inside a Triton pod (the init container of ``vlmserve deploy k8s --plan``): render the GPU memory plan into the
pod's copy of the model repository, with the same code as ``vlmserve plan --render`` and the instance kind of
the image's accelerator (``KIND_CPU`` on ROCm: Triton schedules AMD work as CPU instances).

    python -m vlmserve.orchestrator.deploy.podplan REPO PLAN_FILE BASE_CONFIG INSTANCE_KIND

``BASE_CONFIG`` is ``embedded`` or ``native``. The init container sees no GPU (it requests none): budgets given
as sizes need the plan's ``devices:`` sizes; fractions always work.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlmserve.orchestrator import hardware, memory


def render_in_pod(repo: Path, plan_file: Path, base_config: str, instance_kind: str) -> memory.Rendered:
    resolved = memory.validate(memory.load_plan(plan_file), hardware.detect())
    return memory.render(resolved, repo, None if base_config == "native" else base_config,
                         instance_kind=instance_kind)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[2] not in ("embedded", "native") or argv[3] not in ("KIND_GPU", "KIND_CPU"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        rendered = render_in_pod(Path(argv[0]), Path(argv[1]), argv[2], argv[3])
    except (memory.PlanError, ValueError, OSError) as exc:
        print(f"vlmserve: the GPU memory plan cannot be rendered: {exc}", file=sys.stderr)
        return 1
    for row in rendered.rows():
        print("vlmserve plan: " + " | ".join(row.cells()))
    print(f"vlmserve plan: wrote {len(rendered.files)} configs ({rendered.config_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
