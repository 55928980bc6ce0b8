"""A declarative GPU memory plan: who gets how much of which device, checked, then rendered into knobs.

A plan file (YAML or JSON, see ``docker/gpu-plan.example.yaml``) lists services with a budget per device: a
fraction of the device (``0.25``) or a size (``"6GiB"``). Services are Triton models of our repository, or
``external`` ones (e.g. a co-resident vLLM) that are only accounted for: we print the flag to give them.
``--budget`` CLI flags override or add services (:func:`load_plan`).

:func:`validate` resolves every budget against the detected GPU sizes and refuses over-commitment;
:func:`render` writes ``configs/vlmserve-plan.pbtxt`` next to every model's configs and returns the
``tritonserver`` arguments and environment that go with it.

Most of these knobs only cooperate: read :data:`ENFORCEMENT` before promising anyone a hard limit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ByteSize, ConfigDict, TypeAdapter, ValidationError, field_validator, model_validator

from vlmserve.orchestrator.hardware import Hardware

DEFAULT_RESERVE = 0.05
PLAN_CONFIG_NAME = "vlmserve-plan"
_EPS = 1e-9  # fractions are summed as floats: 0.55 + 0.25 + 0.15 must not exceed 0.95


# ---------------------------------------------------------------------------------------------- enforcement


@dataclass(frozen=True)
class Knob:
    """One memory knob: does it enforce a limit, or only cooperate, and why.

    ``level``: ``"hard"`` is enforced from outside the process (nothing in it can exceed the limit);
    ``"allocator"`` is enforced by one allocator inside the process (memory allocated any other way is not
    counted); ``"cooperative"`` enforces nothing.
    """

    name: str
    enforces: bool
    how: str
    level: str = "cooperative"


ENFORCEMENT: dict[str, Knob] = {
    "mig": Knob(
        "MIG partition", True,
        "hardware partition (A100/H100/H200): a process sees only its slice's memory. The only isolation that "
        "also holds against faults and bandwidth; set up by the administrator, not by this plan.",
        "hard",
    ),
    "mps": Knob(
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", True,
        "the MPS server refuses allocations beyond the limit for each client process. Needs the MPS control "
        "daemon running; every Python-backend instance is its own client process and gets the whole limit.",
        "hard",
    ),
    "onnxruntime": Knob(
        "onnxruntime gpu_mem_limit", True,
        "caps onnxruntime's CUDA arena: the allocator refuses to grow beyond it (per session, i.e. per "
        "instance). CUDA context, cuDNN/cuBLAS workspaces and TensorRT engines are outside the arena.",
        "allocator",
    ),
    "tensorrt": Knob(
        "TensorRT max_workspace_size_bytes", True,
        "caps TensorRT's builder/tactic scratch memory; the engine's weights and activations are extra.",
        "allocator",
    ),
    "torch": Knob(
        "torch.cuda.set_per_process_memory_fraction", True,
        "torch's caching allocator raises OutOfMemoryError beyond the fraction; the CUDA context (~0.3-0.5 GiB) "
        "and allocations not made through torch are not counted.",
        "allocator",
    ),
    "model_load_gpu_limit": Knob(
        "tritonserver --model-load-gpu-limit", False,
        "only gates model loading: Triton refuses to load another model while the device's used memory is "
        "above the fraction; nothing stops a loaded model from growing.",
    ),
    "vllm": Knob(
        "vLLM --gpu-memory-utilization", False,
        "vLLM's own accounting: it sizes its KV cache to stay within the fraction, nobody else is protected.",
    ),
    "cuda_visible_devices": Knob(
        "CUDA_VISIBLE_DEVICES", False,
        "only hides devices from a process; says nothing about memory on the devices it does see.",
    ),
}


def enforcement_table() -> str:
    """:data:`ENFORCEMENT` as a Markdown table (for the README and ``--help`` texts)."""
    label = {"hard": "yes", "allocator": "within its allocator only", "cooperative": "no, cooperative"}
    lines = ["| Knob | Enforces? | How |", "|---|---|---|"]
    lines += [f"| `{k.name}` | {label[k.level]} | {k.how} |" for k in ENFORCEMENT.values()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sizes


class PlanError(ValueError):
    """A plan that cannot be honoured; the message says what is wrong and where."""


# A number and a unit: the shape of a size (a bare number is a fraction of the device, see parse_amount).
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*$")
_UNITS = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"  # what pydantic's ByteSize reads (GB = 10**9, GiB = 2**30)
_BYTE_SIZE = TypeAdapter(ByteSize)


def parse_size(text: str | int) -> int:
    """``"6GiB"`` -> 6442450944, ``"1.5GB"`` -> 1500000000 (GB = 10**9, GiB = 2**30); an int is bytes."""
    if isinstance(text, bool):
        raise PlanError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise PlanError(f"size must be > 0, got {text}")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise PlanError(f"not a size: {text!r} (expected a number and a unit, e.g. 6GiB, 512MiB, 1.5GB)")
    try:
        size = int(_BYTE_SIZE.validate_python(str(text)))
    except ValidationError:
        raise PlanError(f"unknown unit {match.group(2)!r} in {text!r}; valid units: {_UNITS}") from None
    if size <= 0:
        raise PlanError(f"size must be > 0, got {text!r}")
    return size


@dataclass(frozen=True)
class Amount:
    """A parsed budget: exactly one of ``fraction`` (of the device) and ``bytes`` is set."""

    fraction: float | None = None
    bytes: int | None = None

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else human_bytes(self.bytes or 0)


def parse_amount(value: str | float | int, what: str = "budget") -> Amount:
    """A fraction ``0 < f <= 1`` (number or numeric string) or a size with a unit."""
    if isinstance(value, bool):
        raise PlanError(f"{what}: not a fraction or size: {value!r}")
    if isinstance(value, str) and _SIZE.match(value):
        return Amount(bytes=parse_size(value))
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise PlanError(
            f"{what}: not a fraction or size: {value!r} (a fraction like 0.25, or a size like 6GiB)"
        ) from None
    if not math.isfinite(fraction) or fraction <= 0:
        raise PlanError(f"{what} must be > 0, got {value!r}")
    if fraction > 1:
        raise PlanError(f"{what} {value!r} is more than the whole device; a fraction is <= 1, a size needs a unit")
    return Amount(fraction=fraction)


def human_bytes(n: int) -> str:
    """``12884901888`` -> ``"12.0 GiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------- the plan


def _reserve_amount(value: str | float) -> Amount:
    try:
        if float(value) == 0:
            return Amount(fraction=0.0)
    except (TypeError, ValueError):
        pass  # a size such as "2GiB"
    return parse_amount(value, "reserve")


class ServiceBudget(BaseModel):
    """One service's budget; with ``devices`` it is placed on several GPUs and the budget applies per device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    budget: str | float
    device: int = 0
    devices: list[int] | None = None
    external: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("service name must not be empty")
        return value.strip()

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str | float) -> str | float:
        parse_amount(value)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"device index must be >= 0, got {value}")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or any(d < 0 for d in value) or len(set(value)) != len(value):
            raise ValueError(f"devices must be distinct indices >= 0, got {value}")
        return sorted(value)

    @property
    def device_list(self) -> list[int]:
        """The physical device indices this service uses."""
        return list(self.devices) if self.devices else [self.device]

    @property
    def amount(self) -> Amount:
        return parse_amount(self.budget, f"service {self.name!r}: budget")


class MemoryPlan(BaseModel):
    """The whole plan: a per-device ``reserve``, optional device sizes, the services."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reserve: str | float = DEFAULT_RESERVE
    mps: bool = False
    devices: dict[int, str | int] = {}
    services: list[ServiceBudget] = []

    @field_validator("reserve")
    @classmethod
    def _reserve(cls, value: str | float) -> str | float:
        # A zero reserve is allowed (a MIG slice has no neighbours); a negative or whole-device one is not.
        amount = _reserve_amount(value)
        if amount.fraction is not None and amount.fraction >= 1:
            raise ValueError(f"reserve must be < 1, got {value!r}")
        return value

    @field_validator("devices")
    @classmethod
    def _device_sizes(cls, value: dict[int, str | int]) -> dict[int, str | int]:
        for index, size in value.items():
            if index < 0:
                raise ValueError(f"device index must be >= 0, got {index}")
            parse_size(size)
        return value

    @model_validator(mode="after")
    def _unique(self) -> MemoryPlan:
        names = [s.name for s in self.services]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate service(s) {', '.join(duplicates)}: each service appears once")
        return self

    def reserve_amount(self) -> Amount:
        return _reserve_amount(self.reserve)

    def device_sizes(self) -> dict[int, int]:
        return {index: parse_size(size) for index, size in self.devices.items()}


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "plan"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


_FLAG = re.compile(r"^(?P<name>[^=\s]+)=(?P<budget>[^@:]+)(?:@(?P<devices>[0-9,\s]+))?(?P<flags>(?::[a-z]+)*)$")


def parse_budget_flag(text: str) -> dict[str, Any]:
    """``NAME=BUDGET[@DEVICE[,DEVICE...]][:external]`` -> the fields it sets.

    ``florence2=0.25``, ``vllm=0.55:external``, ``siglip_vision=2GiB@1``, ``chat=0.3@0,1``.
    """
    match = _FLAG.match(text.strip())
    if not match:
        raise PlanError(
            f"--budget {text!r}: expected NAME=BUDGET[@DEVICE[,DEVICE...]][:external], "
            "e.g. florence2=0.25, vllm=0.55:external, siglip_vision=2GiB@1"
        )
    fields: dict[str, Any] = {"name": match["name"], "budget": match["budget"].strip()}
    parse_amount(fields["budget"], f"--budget {text!r}")
    if match["devices"]:
        try:
            devices = [int(d) for d in match["devices"].split(",")]
        except ValueError:
            raise PlanError(f"--budget {text!r}: devices must be integers, e.g. @0 or @0,1") from None
        if len(devices) == 1:
            fields["device"], fields["devices"] = devices[0], None
        else:
            fields["devices"] = devices
    for flag in filter(None, match["flags"].split(":")):
        if flag != "external":
            raise PlanError(f"--budget {text!r}: unknown flag :{flag} (only :external)")
        fields["external"] = True
    return fields


def load_plan(path: Path | None, budgets: list[str] | tuple[str, ...] = (), reserve: str | None = None) -> MemoryPlan:
    """The plan file (YAML or JSON; None for none), then ``--budget``/``--reserve`` flags on top.

    A flag names a service: an existing one has the parts the flag gives replaced (budget, devices, external),
    a new one is appended.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror or exc}") from None
        try:
            if path.suffix.lower() == ".json":
                loaded = json.loads(text)
            else:
                import yaml  # YAML is a superset of JSON for our purposes; imported lazily (optional dependency)

                loaded = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - yaml.YAMLError / JSONDecodeError: both are "bad syntax"
            kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
            raise PlanError(f"{path}: not valid {kind}: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise PlanError(
                f"{path}: a plan is a mapping with reserve/mps/devices/services, got {type(loaded).__name__}"
            )
        data = loaded
    where = str(path) if path is not None else "plan"
    try:
        plan = MemoryPlan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{where}: {_validation_message(exc)}") from None
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None

    services = {s.name: s.model_dump() for s in plan.services}
    seen: set[str] = set()
    for text in budgets:
        fields = parse_budget_flag(text)
        if fields["name"] in seen:
            raise PlanError(f"--budget {fields['name']} given twice")
        seen.add(fields["name"])
        services[fields["name"]] = {**services.get(fields["name"], {}), **fields}
    update: dict[str, Any] = {"services": list(services.values())}
    if reserve is not None:
        update["reserve"] = reserve
    try:
        return MemoryPlan.model_validate({**plan.model_dump(), **update})
    except ValidationError as exc:
        raise PlanError(f"{where} with flags: {_validation_message(exc)}") from None


# ---------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ResolvedBudget:
    """One service on one device: its share as a fraction and (when the device size is known) in bytes."""

    service: str
    device: int
    fraction: float
    bytes: int | None
    external: bool
    requested: str  # the budget as written, e.g. "0.25" or "6GiB"


@dataclass(frozen=True)
class ResolvedPlan:
    """A validated plan: every budget resolved per device. ``device_sizes`` is empty when sizes are unknown."""

    plan: MemoryPlan
    budgets: tuple[ResolvedBudget, ...]
    device_sizes: dict[int, int]
    reserve: dict[int, float]  # per device, as a fraction
    notes: tuple[str, ...] = ()

    def for_service(self, name: str) -> list[ResolvedBudget]:
        return [b for b in self.budgets if b.service == name]

    @property
    def services(self) -> list[str]:
        return list(dict.fromkeys(b.service for b in self.budgets))

    @property
    def devices(self) -> list[int]:
        return sorted({b.device for b in self.budgets})

    def total(self, device: int, own_only: bool = False) -> float:
        """Summed fraction on ``device`` (all services, or only ours)."""
        return sum(b.fraction for b in self.budgets if b.device == device and not (own_only and b.external))

    def rows(self) -> list[PlanRow]:
        """Status-table rows; ``enforced_by`` is what the budget *would* be enforced by (nothing rendered yet)."""
        return [
            PlanRow(b.service, b.device, b.fraction, b.bytes, b.external,
                    "the service itself (cooperative)" if b.external else "not rendered")
            for b in self.budgets
        ]


@dataclass(frozen=True)
class PlanRow:
    """One line of the status table."""

    service: str
    device: int
    fraction: float
    bytes: int | None
    external: bool
    enforced_by: str

    def cells(self) -> list[str]:
        """Formatted columns: service, device, fraction, size, external, enforced by."""
        return [self.service, str(self.device), f"{self.fraction:.2f}",
                human_bytes(self.bytes) if self.bytes is not None else "?",
                "yes" if self.external else "no", self.enforced_by]


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def validate(plan: MemoryPlan, hardware: Hardware) -> ResolvedPlan:
    """Resolve every budget against the device sizes and check the plan fits.

    Device sizes are the detected GPUs' (NVIDIA if any, else AMD, by their vendor index); ``plan.devices`` is
    used only when no GPU is detected. With neither, a plan of fractions still validates (bytes unknown) so the
    CPU path can show it; an absolute budget then needs a size and is an error.
    """
    notes: list[str] = []
    detected = hardware.nvidia or hardware.amd
    sizes: dict[int, int]
    if detected:
        sizes = {g.index: g.memory_total_bytes for g in detected}
        if plan.devices and plan.device_sizes() != {i: sizes.get(i) for i in plan.devices}:
            notes.append("plan.devices ignored: the detected GPU sizes are used")
    else:
        sizes = plan.device_sizes()
    known = bool(sizes)

    errors: list[str] = []
    reserve_amount = plan.reserve_amount()
    budgets: list[ResolvedBudget] = []
    for service in plan.services:
        amount = service.amount
        for device in service.device_list:
            if known and device not in sizes:
                errors.append(f"service {service.name!r}: device {device} does not exist "
                              f"(devices: {', '.join(map(str, sorted(sizes)))})")
                continue
            size = sizes.get(device)
            nbytes: int | None
            if amount.bytes is not None:
                if size is None:
                    errors.append(f"service {service.name!r}: absolute budget {service.budget} needs the size of "
                                  f"device {device}; no GPU detected, give it under `devices:` (e.g. {{0: 80GiB}}) "
                                  "or use a fraction")
                    continue
                fraction, nbytes = amount.bytes / size, amount.bytes
            else:
                assert amount.fraction is not None
                fraction, nbytes = amount.fraction, (int(amount.fraction * size) if size else None)
            budgets.append(ResolvedBudget(service.name, device, fraction, nbytes, service.external,
                                          str(service.budget)))

    reserve: dict[int, float] = {}
    for device in sorted({b.device for b in budgets} | set(sizes)):
        if reserve_amount.bytes is not None:
            if device not in sizes:
                errors.append(f"reserve {plan.reserve} is a size but device {device}'s size is unknown; "
                              "use a fraction or give `devices:`")
                continue
            reserve[device] = reserve_amount.bytes / sizes[device]
        else:
            reserve[device] = reserve_amount.fraction or 0.0
    for device, r in reserve.items():
        on_device = [b for b in budgets if b.device == device]
        total = sum(b.fraction for b in on_device)
        if total > 1 - r + _EPS:
            parts = " + ".join(f"{b.service} {_fmt(b.fraction)}" for b in on_device)
            errors.append(f"device {device}: {parts} = {_fmt(total)} > {_fmt(1 - r)} (1 - reserve {_fmt(r)})")
    if errors:
        raise PlanError("GPU memory plan does not fit:\n  " + "\n  ".join(errors))
    return ResolvedPlan(plan, tuple(budgets), dict(sizes), reserve, tuple(notes))


# ---------------------------------------------------------------------------------------------- rendering


@dataclass
class Rendered:
    """What :func:`render` wrote and what to start ``tritonserver`` with.

    ``env`` holds ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (so CUDA numbers devices like NVML/nvidia-smi, whose
    indices the plan uses), ``CUDA_VISIBLE_DEVICES`` only when our services use exactly devices ``0..n-1``
    (hiding others then renumbers nothing; otherwise it stays unset because the configs' ``gpus: [...]`` are
    physical indices), and with ``mps: true`` ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``.
    """

    config_name: str
    files: list[Path]
    triton_args: list[str]
    env: dict[str, str]
    external_hints: dict[str, str]
    resolved: ResolvedPlan
    enforced_by: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[PlanRow]:
        """Status-table rows: service, device, budget fraction/bytes, external, what enforces it."""
        return [
            PlanRow(b.service, b.device, b.fraction, b.bytes, b.external, self.enforced_by.get(b.service, "-"))
            for b in self.resolved.budgets
        ]


def model_dirs(repo: Path) -> list[str]:
    """Names of the model directories of a Triton repository (those holding a ``config.pbtxt``)."""
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))


def _set_param(config: Any, key: str, value: str) -> None:
    config.parameters[key].string_value = value


def _apply(config: Any, budgets: list[ResolvedBudget], instance_kind: str) -> tuple[str, list[str]]:
    """Write one service's budget into a parsed ModelConfig; returns (enforced-by text, notes)."""
    from tritonclient.grpc import model_config_pb2

    devices = sorted(b.device for b in budgets)
    if instance_kind == "KIND_GPU":
        if not config.instance_group:
            config.instance_group.add(count=1)
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
            del group.gpus[:]
            group.gpus.extend(devices)
    # Every group places `count` instances on each listed GPU, and every instance is its own process (Python
    # backend) or its own onnxruntime session: the service's budget is shared between them.
    per_device = sum(max(g.count, 1) for g in config.instance_group) or 1
    # One config serves all the service's devices: on devices of different sizes the smallest share is written.
    fraction = min(b.fraction for b in budgets) / per_device
    known = [b.bytes for b in budgets if b.bytes is not None]
    nbytes = min(known) // per_device if len(known) == len(budgets) else None
    notes: list[str] = []
    split = f" / {per_device} instances" if per_device > 1 else ""

    if config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        if nbytes is None:
            return "nothing (device size unknown: gpu_mem_limit not set)", [
                f"{config.name}: gpu_mem_limit not written, the device size is unknown"]
        # Top level on purpose: a top-level `parameters` block in onnxruntime_backend resets a gpu_mem_limit
        # given under execution_accelerators (docs/platform.md, "Exports").
        _set_param(config, "gpu_mem_limit", str(nbytes))
        for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
            if accelerator.name == "tensorrt":
                cap = nbytes // 2
                current = accelerator.parameters.get("max_workspace_size_bytes")
                if current is None or not current.isdigit() or int(current) > cap:
                    accelerator.parameters["max_workspace_size_bytes"] = str(cap)
        return f"onnxruntime gpu_mem_limit {human_bytes(nbytes)}{split}", notes
    if config.backend == "python":
        # Two caps on one share: torch's allocator and (where the model runs one) an onnxruntime session each get
        # the whole share, because which of them needs it depends on the model; in a model using both, their sum
        # is not capped (an MPS limit is what bounds the process).
        _set_param(config, "gpu_memory_fraction", f"{fraction:.6g}")
        if nbytes is not None:
            _set_param(config, "gpu_mem_limit", str(nbytes))
        return f"torch memory fraction {fraction:.3g}{split}" + (
            f" + onnxruntime gpu_mem_limit {human_bytes(nbytes)}" if nbytes is not None else ""), notes
    backend = config.backend or config.platform or "unknown"
    return "nothing (no memory knob for this backend)", [f"{config.name}: backend {backend!r} has no memory knob"]


def _mps_size(n: int) -> str:
    # MPS accepts values with a G or M suffix; round down so the limit never exceeds the budget.
    return f"{n // 2**30}G" if n % 2**30 == 0 else f"{n // 2**20}M"


def _external_hint(name: str, budgets: list[ResolvedBudget]) -> str:
    fraction = min(b.fraction for b in budgets)
    devices = ",".join(str(b.device) for b in budgets)
    if "vllm" in name.lower():
        return f"--gpu-memory-utilization {fraction:.2f}"
    sizes = [b.bytes for b in budgets if b.bytes is not None]
    size = f" ({human_bytes(min(sizes))})" if len(sizes) == len(budgets) else ""
    return f"limit it to {fraction:.2f} of device {devices}{size}"


def render(
    resolved: ResolvedPlan,
    repo: Path,
    base_config_name: str | None,
    out_config_name: str = PLAN_CONFIG_NAME,
    *,
    instance_kind: str = "KIND_GPU",
    write: bool = True,
) -> Rendered:
    """Write ``<model>/configs/<out_config_name>.pbtxt`` for every model of ``repo``, budgets applied.

    The base of each is ``configs/<base_config_name>.pbtxt`` where it exists, else ``config.pbtxt`` (the same
    fallback Triton applies to ``--model-config-name``). Unbudgeted models are copied unchanged so
    ``tritonserver --model-config-name=<out_config_name>`` sees the whole repository. ``instance_kind`` is the
    :class:`~vlmserve.orchestrator.hardware.Choice`'s: with ``KIND_CPU`` (ROCm) the instance groups are left alone and
    only the memory parameters are written.

    Device indices stay physical throughout (see :class:`Rendered` for the environment that keeps them so).
    ``write=False`` is a dry run: everything is computed and checked, nothing is written (``files`` lists the
    paths it would write).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if base_config_name == out_config_name:
        raise PlanError(f"the plan's config name {out_config_name!r} must differ from its base config name")
    models = model_dirs(repo)
    missing = [s for s in resolved.services if s not in models and not resolved.for_service(s)[0].external]
    if missing:
        raise PlanError(
            f"budget for {', '.join(missing)}: not a model of {repo} and not marked external; "
            f"models: {', '.join(models) or '(none)'}"
        )

    files: list[Path] = []
    enforced: dict[str, str] = {}
    notes = list(resolved.notes)
    for model in models:
        base = repo / model / "configs" / f"{base_config_name}.pbtxt" if base_config_name else None
        source = base if base is not None and base.exists() else repo / model / "config.pbtxt"
        try:
            config = text_format.Parse(source.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as exc:
            raise PlanError(f"{source}: not a valid model config: {exc}") from None
        budgets = resolved.for_service(model)
        if budgets and not budgets[0].external:
            enforced[model], model_notes = _apply(config, budgets, instance_kind)
            notes.extend(model_notes)
        out = repo / model / "configs" / f"{out_config_name}.pbtxt"
        if write:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text_format.MessageToString(config))
        files.append(out)

    triton_args, env, knob_notes = process_knobs(resolved)
    notes.extend(knob_notes)
    hints = {}
    for name in resolved.services:
        budgets = resolved.for_service(name)
        if budgets[0].external:
            hints[name] = _external_hint(name, budgets)
            enforced[name] = f"{name} itself (cooperative): {hints[name]}"
    return Rendered(out_config_name, files, triton_args, env, hints, resolved, enforced, notes)


def process_knobs(resolved: ResolvedPlan) -> tuple[list[str], dict[str, str], list[str]]:
    """The plan's per-process knobs, independent of any model config: ``tritonserver`` arguments, environment
    (see :class:`Rendered`) and notes. :func:`render` uses them; so do the cluster renderers
    (``vlmserve.orchestrator.deploy``), which have no repository at hand."""
    notes: list[str] = []
    own = [b for b in resolved.budgets if not b.external]
    own_devices = sorted({b.device for b in own})
    triton_args = [
        # Triton compares the device's whole used memory (external services included) with this fraction
        # before each load, so the limit is everything the plan hands out on the device, not only our share.
        f"--model-load-gpu-limit={device}:{resolved.total(device):.3f}"
        for device in own_devices
    ]
    env: dict[str, str] = {}
    if own_devices:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if own_devices == list(range(len(own_devices))):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, own_devices))
        else:
            notes.append(f"CUDA_VISIBLE_DEVICES left unset: devices {own_devices} are not 0..n-1 and the configs "
                         "name physical indices")
    if resolved.plan.mps and own_devices:
        limits = []
        for device in own_devices:
            used = [b.bytes for b in own if b.device == device]
            if any(u is None for u in used):
                notes.append(f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT not set: device {device}'s size is unknown")
                break
            limits.append(f"{device}={_mps_size(sum(u for u in used if u is not None))}")
        else:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(limits)
    return triton_args, env, notes
