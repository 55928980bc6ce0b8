"""What a start needs before any process or container exists: the accelerator, the image and the GPU memory plan.

Every launcher's start calls :func:`plan_launch` first; it fails (before anything is started) with a message that
says what to change: an absent accelerator, an over-committed memory plan, a budget for a model that is not served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmserve.orchestrator import hardware, memory
from vlmserve.orchestrator.settings import OrchestratorSettings


@dataclass
class Launch:
    choice: hardware.Choice
    hardware: hardware.Hardware
    plan: memory.ResolvedPlan | None = None
    rendered: memory.Rendered | None = None
    warnings: list[str] = field(default_factory=list)

    def triton_args(self) -> list[str]:
        return list(self.rendered.triton_args) if self.rendered else []

    def env(self) -> dict[str, str]:
        """Environment for Triton: the chosen accelerator (the Python models place their work by it on ROCm)
        and what the memory plan rendered (``CUDA_VISIBLE_DEVICES``, ...)."""
        from vlmserve.model_repository.common import (
            ACCELERATOR_ENV,  # the models' own name for it; numpy only when used
        )

        return {ACCELERATOR_ENV: self.choice.accelerator, **(self.rendered.env if self.rendered else {})}

    def model_config_name(self, default: str | None) -> str | None:
        """The rendered plan's configs when there is one, else the launcher's default flavour."""
        return self.rendered.config_name if self.rendered else default


def plan_launch(
    settings: OrchestratorSettings,
    budgets: list[str] | None = None,
    reserve: str | None = None,
    in_image: bool = False,
    detected: hardware.Hardware | None = None,
) -> Launch:
    """Detect, choose the accelerator, validate the memory plan and render it into the repository.

    The plan starts from the configs the launcher would serve: where Triton runs from a vlmserve image
    (``in_image``: Docker) the image's flavour (native ``config.pbtxt`` in the NGC image, ``embedded`` otherwise);
    as local processes the settings' flavour, embedded by default (the wheel's tritonserver has only the Python
    backend).
    """
    hw = detected if detected is not None else hardware.detect()
    choice = hardware.choose(settings.accelerator, hw, settings.fallback)
    base_config_name = choice.model_config_name if in_image else settings.model_config_name
    launch = Launch(choice=choice, hardware=hw, warnings=list(choice.warnings))
    plan_file: Path | None = settings.gpu_plan
    if plan_file is None and not budgets and reserve is None:
        return launch
    plan = memory.load_plan(plan_file, list(budgets or []), reserve)
    launch.plan = memory.validate(plan, hw)
    if choice.accelerator == "cpu":
        launch.warnings.append("the GPU memory plan is validated but not applied: running on CPU")
        return launch
    launch.rendered = memory.render(launch.plan, settings.repository_path, base_config_name,
                                    instance_kind=choice.instance_kind)
    return launch
