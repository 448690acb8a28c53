"""Accelerators per instance type, shared by every backend (validation, GPU defaults).

Only the launcher's view: the GPU count decides ``--gpus-per-node``, ``nvidia.com/gpu`` and
whether NCCL/EFA defaults apply. Sources: AWS instance type pages (2026).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceSpec:
    gpus: int
    """Accelerators per instance (GPUs, or Neuron devices for trn/inf)."""
    gpu_memory_gib: int = 0
    """Memory per accelerator."""
    efa: int = 0
    """EFA interfaces (0 = none)."""
    accelerator: str = "cuda"
    """cuda, neuron or cpu."""


_GPU_FAMILIES: dict[str, InstanceSpec] = {
    "g5.xlarge": InstanceSpec(1, 24),
    "g5.2xlarge": InstanceSpec(1, 24),
    "g5.4xlarge": InstanceSpec(1, 24),
    "g5.8xlarge": InstanceSpec(1, 24),
    "g5.16xlarge": InstanceSpec(1, 24),
    "g5.12xlarge": InstanceSpec(4, 24),
    "g5.24xlarge": InstanceSpec(4, 24),
    "g5.48xlarge": InstanceSpec(8, 24, efa=1),
    "g6.xlarge": InstanceSpec(1, 24),
    "g6.12xlarge": InstanceSpec(4, 24),
    "g6.48xlarge": InstanceSpec(8, 24),
    "g6e.xlarge": InstanceSpec(1, 48),
    "g6e.12xlarge": InstanceSpec(4, 48),
    "g6e.48xlarge": InstanceSpec(8, 48),
    "p3.16xlarge": InstanceSpec(8, 16),
    "p3dn.24xlarge": InstanceSpec(8, 32, efa=1),
    "p4d.24xlarge": InstanceSpec(8, 40, efa=4),
    "p4de.24xlarge": InstanceSpec(8, 80, efa=4),
    "p5.48xlarge": InstanceSpec(8, 80, efa=32),
    "p5e.48xlarge": InstanceSpec(8, 141, efa=32),
    "p5en.48xlarge": InstanceSpec(8, 141, efa=16),
    "p6-b200.48xlarge": InstanceSpec(8, 179, efa=8),
    "trn1.2xlarge": InstanceSpec(1, 32, accelerator="neuron"),
    "trn1.32xlarge": InstanceSpec(16, 32, efa=8, accelerator="neuron"),
    "trn1n.32xlarge": InstanceSpec(16, 32, efa=16, accelerator="neuron"),
}
_CPU_FAMILIES = ("m5", "m6i", "m7i", "c5", "c6i", "c7i", "r5", "t3")
_CPU_SIZES = (
    "large",
    "xlarge",
    "2xlarge",
    "4xlarge",
    "8xlarge",
    "12xlarge",
    "16xlarge",
    "24xlarge",
)


def _strip(instance_type: str) -> str:
    return instance_type.removeprefix("ml.")


def known_instance_types() -> list[str]:
    cpu = [f"{family}.{size}" for family in _CPU_FAMILIES for size in _CPU_SIZES]
    return sorted([*_GPU_FAMILIES, *cpu])


def instance_spec(instance_type: str) -> InstanceSpec | None:
    """The spec of ``instance_type`` (with or without ``ml.``); None if unknown."""
    name = _strip(instance_type)
    if name in _GPU_FAMILIES:
        return _GPU_FAMILIES[name]
    family, _, size = name.partition(".")
    if family in _CPU_FAMILIES and size in _CPU_SIZES:
        return InstanceSpec(0, accelerator="cpu")
    return None
