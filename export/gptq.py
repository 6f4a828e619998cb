"""GPTQ: error-compensating rounding for int4 / int8 weights, stored in the format's own layout.

Round-to-nearest (RTN, `WeightFormat.pack`) rounds every weight independently. GPTQ (Frantar et al., 2022)
rounds the columns of W [N, K] one at a time and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction loss ||X W^T - X W_hat^T||^2, i.e.
H = X^T X over the calibration inputs X [n, K]. The result is ordinary packed tensors of the same format (codes,
scales, zero points), dequantized by the same reference; only the choice of codes (and of the group scales,
taken from the error-updated weights when a group starts) differs. It lowers the *output* error on inputs like
the calibration data; the per-weight error may be larger than RTN's.

Scales follow the format's own rule (`fmt.pack` on the group's current columns), so a GPTQ-packed weight is
indistinguishable in layout from an RTN-packed one; `tests/test_export_calib.py` checks that it round-trips
through unpack/repack and that it lowers the output error against RTN.

Supported: int4-g{32,64,128}[-asym] (per-group scales along K) and int8 / w8a8 (one scale per output channel,
i.e. a single group spanning K). Math in float64 (the sizes exported on CPU are small enough).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.formats import Int4BlockFormat, Int8ChannelFormat, get_format


def supports(fmt: str) -> bool:
    return isinstance(get_format(fmt), (Int4BlockFormat, Int8ChannelFormat)) if fmt not in ("fp32", "int64") \
        else False


def _group_params(fmt, w: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """The format's scale and zero point for a group of columns w [N, g] -> (scale [N], zp [N], qmin, qmax)."""
    p = fmt.pack(w.float())
    if isinstance(fmt, Int8ChannelFormat):
        return p["scale"].double(), torch.zeros(w.shape[0], dtype=torch.float64), -127, 127
    scale = p["scales"][:, 0].double()
    if fmt.asym:
        zp = fmt.unpack(p)["zero_points"][:, 0].double()
        return scale, zp, 0, 15
    return scale, torch.full_like(scale, 8.0), 1, 15


def hessian(x: Tensor) -> Tensor:
    """H = X^T X / n for calibration inputs x [n, K] (float64)."""
    x = x.double().reshape(-1, x.shape[-1])
    return x.T @ x / max(x.shape[0], 1)


def gptq_pack(w: Tensor, H: Tensor, fmt_name: str, damp: float = 0.01, block: int = 128,
              name: str = "weight") -> dict[str, Tensor]:
    """Pack w [N, K] in `fmt_name` with GPTQ rounding against H [K, K]; returns the format's packed dict."""
    fmt = get_format(fmt_name)
    if not supports(fmt_name):
        raise ValueError(f"{name}: GPTQ supports int4 and int8 formats, not {fmt_name}")
    w0 = fmt.pack(w, name=name)  # validates (2-D, finite) with the format's own error messages
    N, K = w.shape
    group = fmt.block if isinstance(fmt, Int4BlockFormat) else K
    W = w.double().clone()
    H = H.double().clone()
    if H.shape != (K, K) or not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: Hessian of shape {tuple(H.shape)} (need finite [{K}, {K}])")
    dead = torch.diag(H) == 0  # input channels never active in the calibration data: plain RTN for them
    H[dead, dead] = 1.0
    H += torch.eye(K, dtype=H.dtype) * damp * torch.diag(H).mean()
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:  # not positive definite even after damping: fall back to RTN
        return w0
    codes = torch.zeros(N, K, dtype=torch.float64)
    scales, zps = [], []
    scale = zp = None
    qmin = qmax = 0
    for b0 in range(0, K, block):  # lazy batch updates (the GPTQ paper's blocking): exact, just faster
        b1 = min(b0 + block, K)
        Wb, Err = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, dtype=torch.float64)
        Ub = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % group == 0:  # a new group: its scale from the error-updated weights, by the format's rule
                g1 = min(col + group, K)
                cur = torch.cat([Wb[:, j:], W[:, b1:g1]], 1) if g1 > b1 else Wb[:, j:j + g1 - col]
                scale, zp, qmin, qmax = _group_params(fmt, cur)
                scales.append(scale)
                zps.append(zp)
            s = scale.clamp(min=torch.finfo(torch.float64).tiny)
            q = (torch.round(Wb[:, j] / s) + zp).clamp(qmin, qmax)
            codes[:, col] = q
            err = (Wb[:, j] - (q - zp) * scale) / Ub[j, j]
            Wb[:, j:] -= err[:, None] * Ub[j, j:][None, :]
            Err[:, j] = err
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    return _repack(fmt, codes, torch.stack(scales, 1), torch.stack(zps, 1), N, K)


def _repack(fmt, codes: Tensor, scales: Tensor, zps: Tensor, N: int, K: int) -> dict[str, Tensor]:
    if isinstance(fmt, Int8ChannelFormat):
        return fmt.repack({"codes": codes.to(torch.int8), "scale": scales[:, 0].float()})
    nb = scales.shape[1]
    pad = nb * fmt.block - K  # padded columns hold the zero point (dequantize to 0), as pack writes them
    codes = torch.cat([codes, zps[:, -1:].expand(N, pad)], 1) if pad else codes
    out = {"codes": codes.to(torch.uint8), "scales": scales.float(), "shape": torch.tensor([N, K], dtype=torch.int64)}
    if fmt.asym:
        out["zero_points"] = zps.to(torch.uint8)
    return fmt.repack(out)


def output_error(x: Tensor, w: Tensor, packed: dict[str, Tensor], fmt: str) -> float:
    """Relative output error ||x W^T - x W_hat^T|| / ||x W^T|| of a packed weight on inputs x [n, K]."""
    ref = x.double() @ w.double().T
    got = x.double() @ get_format(fmt).dequantize(packed).double().T
    return float((ref - got).norm() / ref.norm().clamp(min=1e-30))
