"""OpenCLBackend: a flashport backend (contract API 1) on OpenCL through pyopencl.

Native: linear on int8 weights (W8A16), moe on int8 experts (the same GEMV kernel per expert, SwiGLU in torch),
rms_norm and rope. Everything else falls back, per op, to flashport's torch reference. Tensors arrive and leave
as CPU torch tensors; each op copies its activations to OpenCL buffers and the result back (weights are uploaded
once, by `upload`). On a discrete device those copies would dominate: a production plugin keeps activations on the
device between ops (torch_device = its own device type).

Exactness (checked by `flashport conformance opencl`): rope is bit-exact with the reference (FP_CONTRACT OFF,
same elementwise operations); linear, moe and rms_norm are tolerance-bound (another summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import pyopencl as cl
import torch
import torch.nn.functional as F

from flashport.backends.contract import Backend, BackendError, Capabilities, DeviceInfo, QuantWeight

LS = 64  # work-group size of the reduction kernels (kernels.cl's LS)


@dataclass
class Int8Weight:
    """An int8 weight on the OpenCL device: codes [N, K] and per-row scales [N]."""

    n: int
    k: int
    codes: cl.Buffer
    scale: cl.Buffer


def _devices() -> list[cl.Device]:
    try:
        return [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as e:  # no ICD / no platform
        raise BackendError(f"no OpenCL platform found ({e}); pip install pocl-binary-distribution for a CPU one")


def _build(device: cl.Device) -> tuple[cl.Context, cl.Program]:
    """Compile kernels.cl for one device; BackendError with the driver's reason when it cannot.

    A driver can list a device and still be unable to compile for it: PoCL asks its LLVM for the host CPU's name,
    and an LLVM older than the CPU answers 'generic', which clang rejects ("unknown target CPU 'generic'"; PyPI's
    pocl-binary-distribution 3.0 ships LLVM 14, which predates AMD Zen 4/5)."""
    ctx = cl.Context([device])
    try:
        return ctx, cl.Program(ctx, files(__package__).joinpath("kernels.cl").read_text()).build()
    except cl.Error as e:
        log = " ".join(line.strip() for line in str(e).splitlines() if "error:" in line) or str(e).splitlines()[0]
        hint = (" (this driver's LLVM does not know the CPU: install a newer PoCL, e.g. `apt install "
                "pocl-opencl-icd`)") if "unknown target CPU" in log else ""
        raise BackendError(f"OpenCL device {device.name.strip()!r} ({device.platform.version.strip()}) cannot "
                           f"compile kernels: {log}{hint}") from None


class OpenCLBackend(Backend):
    name = "opencl"
    api_version = (1, 0)
    priority = 3  # below the built-in torch backend: "auto" never picks this example

    def __init__(self, device: str | int | None = None):
        devs = _devices()
        if not devs:
            raise BackendError("no OpenCL device found")
        if device not in (None, ""):
            i = int(str(device).rpartition(":")[2])
            if not 0 <= i < len(devs):
                raise BackendError(f"OpenCL device {device!r} not found; there are {len(devs)} (opencl:0..)")
            candidates = [i]
        else:  # the first device whose driver can compile: a machine may hold an ICD too old for its CPU
            candidates = list(range(len(devs)))
        errors = []
        for i in candidates:
            try:
                self.ctx, prg = _build(devs[i])
                break
            except BackendError as e:
                errors.append(str(e))
        else:
            raise BackendError("; ".join(errors))
        self.index, self.device = i, devs[i]
        self.queue = cl.CommandQueue(self.ctx)
        self.kernels = {name: cl.Kernel(prg, name) for name in ("linear_int8", "rms_norm", "rope")}  # built once
        self.torch_device = torch.device("cpu")

    def devices(self) -> list[DeviceInfo]:
        kind = "gpu" if self.device.type & cl.device_type.GPU else "cpu"
        return [DeviceInfo(f"opencl:{self.index} ({self.device.name.strip()})", kind, self.device.global_mem_size)]

    def capabilities(self) -> Capabilities:
        return Capabilities(ops={"linear": {"int8"}, "moe": {"int8"}, "rms_norm": True, "rope": True})

    # -- buffers ---------------------------------------------------------------------------------------------
    def _in(self, t: torch.Tensor, dtype=np.float32) -> cl.Buffer:
        a = np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
        return cl.Buffer(self.ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=a)

    def _out(self, shape) -> tuple[np.ndarray, cl.Buffer]:
        a = np.empty(shape, dtype=np.float32)
        return a, cl.Buffer(self.ctx, cl.mem_flags.WRITE_ONLY, max(a.nbytes, 4))

    def _read(self, a: np.ndarray, buf: cl.Buffer) -> torch.Tensor:
        if a.size:
            cl.enqueue_copy(self.queue, a, buf)
        return torch.from_numpy(a)

    def upload(self, w: QuantWeight) -> Int8Weight:
        if w.fmt != "int8":
            raise BackendError(f"opencl: weight format {w.fmt!r} is not supported (int8 only)")
        n, k = w.shape
        return Int8Weight(n, k, self._in(w.tensors["weight"], np.int8), self._in(w.tensors["scale"]))

    # -- ops (signatures and semantics of flashport.backends.reference) ----------------------------------------
    def linear(self, x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, w.k)  # [T, K]
        t = x2.shape[0]
        out, buf = self._out((t, w.n))
        if t and w.n:
            self.kernels["linear_int8"](self.queue, (w.n * LS, t), (LS, 1), self._in(x2), w.codes, w.scale, buf,
                                 np.int32(w.k), np.int32(w.n))
        return self._read(out, buf).reshape(*lead, w.n)

    def moe(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts, limit: float) -> torch.Tensor:
        """Each routed expert once over its tokens (as the reference), its three GEMMs on the int8 kernel."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            w1, w3, w2 = experts[e]
            xe = x[rows]
            h = F.silu(self.linear(xe, w1).clamp(max=limit)) * self.linear(xe, w3).clamp(-limit, limit)
            out.index_add_(0, rows, self.linear(h, w2) * weights[rows, slot, None])
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        rows = x.numel() // d if d else 0
        out, buf = self._out(tuple(x.shape))
        if rows:
            wbuf = self._in(weight if weight is not None else torch.zeros(1))
            self.kernels["rms_norm"](self.queue, (rows * LS,), (LS,), self._in(x), wbuf, buf, np.int32(d),
                              np.float32(eps), np.int32(weight is not None))
        return self._read(out, buf)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        t, d, half = x.shape[0], x.shape[-1], cos.shape[-1]
        heads = x[0].numel() // d if t else 0
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32).copy()  # the kernel works in place
        buf = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=a) if a.size else None
        if a.size and half:
            self.kernels["rope"](self.queue, (t * heads, half), None, buf, self._in(cos), self._in(sin), np.int32(heads),
                          np.int32(d), np.int32(half), np.float32(-1.0 if inverse else 1.0))
        return self._read(a, buf) if buf is not None else torch.from_numpy(a)
