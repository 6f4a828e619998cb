"""The built-in torch backend: CPU and any torch device (cuda; `npu` and other PrivateUse1 devices when their torch
extension is installed). Every op is the reference math run on the device; quantized weights are dequantized
once at upload into the compute dtype, so decode runs at the device's dense-matmul speed.

Deterministic mode (`deterministic=True`) asks torch for deterministic kernels. It is bit-exact with the
reference on the CPU (same code).
"""

from __future__ import annotations

import torch

from . import reference
from .contract import OPS, WEIGHT_FORMATS, Backend, Capabilities, DeviceInfo, QuantWeight


def _device_memory(dev: torch.device) -> tuple[int, int]:
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return total, free
    try:
        import os

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return pages * size, avail * size
    except (ValueError, OSError, AttributeError):
        return 0, 0


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", deterministic: bool = False):
        self.torch_device = torch.device(device)
        if self.torch_device.type not in ("cpu", "cuda") and not hasattr(torch, self.torch_device.type):
            raise RuntimeError(f"torch has no device type {self.torch_device.type!r} (is its extension installed?)")
        self.deterministic = deterministic
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def devices(self) -> list[DeviceInfo]:
        total, free = _device_memory(self.torch_device)
        kind = "cpu" if self.torch_device.type == "cpu" else ("gpu" if self.torch_device.type == "cuda" else "npu")
        return [DeviceInfo(str(self.torch_device), kind, total, free)]

    def capabilities(self) -> Capabilities:
        ops = {op: (set(WEIGHT_FORMATS) if weighted else True) for op, weighted in OPS.items()}
        return Capabilities(ops=ops, deterministic=self.deterministic)

    def upload(self, w: QuantWeight):
        return w.dequantize().to(self.torch_device)


# every op is the reference's own function: same math, on whatever device the tensors live
for _op in OPS:
    setattr(TorchBackend, _op, staticmethod(getattr(reference, _op)))
