"""Accelerators per instance type, shared by every backend (validation, GPU defaults) and
the memory plan.

The GPU count decides ``--gpus-per-node``, ``nvidia.com/gpu`` and whether NCCL/EFA defaults
apply; the GPU model and its memory are what the memory plan (``plan=true``) compares a
step against, and the model's dense bf16 peak (``adapter.metrics.PEAK_FLOPS``, the one
table the adapter's MFU uses too) what it times a step with. Sources: AWS instance type
pages (2026).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter.metrics import peak_flops


@dataclass(frozen=True)
class InstanceSpec:
    """One instance type's accelerators."""

    gpus: int
    """Accelerators per instance (GPUs, or Neuron devices for trn/inf)."""
    gpu_memory_gib: int = 0
    """Memory per accelerator."""
    efa: int = 0
    """EFA interfaces (0 = none)."""
    accelerator: str = "cuda"
    """cuda, neuron or cpu."""
    gpu_model: str | None = None
    """The accelerator's model as ``torch.cuda.get_device_name`` contains it (A100, H100...)."""

    @property
    def bf16_peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of one accelerator (``adapter.metrics.PEAK_FLOPS``); None
        where that table has no figure (V100s have no bf16, Neuron devices aren't in it)."""
        return peak_flops(self.gpu_model) if self.accelerator == "cuda" else None


_GPU_FAMILIES: dict[str, InstanceSpec] = {
    "g5.xlarge": InstanceSpec(1, 24, gpu_model="A10G"),
    "g5.2xlarge": InstanceSpec(1, 24, gpu_model="A10G"),
    "g5.4xlarge": InstanceSpec(1, 24, gpu_model="A10G"),
    "g5.8xlarge": InstanceSpec(1, 24, gpu_model="A10G"),
    "g5.16xlarge": InstanceSpec(1, 24, gpu_model="A10G"),
    "g5.12xlarge": InstanceSpec(4, 24, gpu_model="A10G"),
    "g5.24xlarge": InstanceSpec(4, 24, gpu_model="A10G"),
    "g5.48xlarge": InstanceSpec(8, 24, efa=1, gpu_model="A10G"),
    "g6.xlarge": InstanceSpec(1, 24, gpu_model="L4"),
    "g6.12xlarge": InstanceSpec(4, 24, gpu_model="L4"),
    "g6.48xlarge": InstanceSpec(8, 24, gpu_model="L4"),
    "g6e.xlarge": InstanceSpec(1, 48, gpu_model="L40S"),
    "g6e.12xlarge": InstanceSpec(4, 48, gpu_model="L40S"),
    "g6e.48xlarge": InstanceSpec(8, 48, gpu_model="L40S"),
    "p3.16xlarge": InstanceSpec(8, 16, gpu_model="V100"),
    "p3dn.24xlarge": InstanceSpec(8, 32, efa=1, gpu_model="V100"),
    "p4d.24xlarge": InstanceSpec(8, 40, efa=4, gpu_model="A100"),
    "p4de.24xlarge": InstanceSpec(8, 80, efa=4, gpu_model="A100"),
    "p5.48xlarge": InstanceSpec(8, 80, efa=32, gpu_model="H100"),
    "p5e.48xlarge": InstanceSpec(8, 141, efa=32, gpu_model="H200"),
    "p5en.48xlarge": InstanceSpec(8, 141, efa=16, gpu_model="H200"),
    "p6-b200.48xlarge": InstanceSpec(8, 179, efa=8, gpu_model="B200"),
    "trn1.2xlarge": InstanceSpec(1, 32, accelerator="neuron", gpu_model="Trainium"),
    "trn1.32xlarge": InstanceSpec(16, 32, efa=8, accelerator="neuron", gpu_model="Trainium"),
    "trn1n.32xlarge": InstanceSpec(16, 32, efa=16, accelerator="neuron", gpu_model="Trainium"),
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
