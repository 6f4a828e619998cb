"""Backend registry: the built-ins plus out-of-tree plugins found through the `flashport.backends` entry points.

A plugin's entry point names a factory (usually its Backend subclass) called with keyword options (device=...).
A plugin that fails to import or to initialise produces one warning naming it and the reason; the rest works.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from .contract import API_VERSION, Backend, BackendError

log = logging.getLogger("flashport.backends")

ENTRY_POINT_GROUP = "flashport.backends"


def _importable(target: str) -> str:
    """'' if the factory's module (and what it imports) loads, else the reason."""
    try:
        importlib.import_module(target.partition(":")[0])
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"{e.__class__.__name__}: {e}"
    return ""


def _torch_probe() -> tuple[bool, str, int]:
    return True, "", 10


def _triton_probe() -> tuple[bool, str, int]:
    import os

    import torch

    why = _importable(BUILTINS["triton"][0])
    if why:
        return False, why, 0
    if torch.cuda.is_available():
        return True, "", 30
    if os.environ.get("TRITON_INTERPRET") == "1":  # usable, but never picked by "auto": the interpreter is slow
        return True, "interpreter (TRITON_INTERPRET=1), no CUDA device", 1
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)", 0


def _onnx_probe() -> tuple[bool, str, int]:
    why = _importable(BUILTINS["onnxruntime"][0])
    return (not why), why, 5


# name -> (module:attribute of the factory, availability probe -> (ok, note, priority for backend="auto"))
BUILTINS = {
    # the torch backend with the fast CPU kernels (falls back to plain torch ops off the CPU / without a compiler)
    "torch": ("flashport.backends.torch_fast:FastTorchBackend", _torch_probe),
    "triton": ("flashport.kernels.backend:TritonBackend", _triton_probe),
    "onnxruntime": ("flashport.backends.onnx_backend:OnnxRuntimeBackend", _onnx_probe),
}


@dataclass
class BackendInfo:
    name: str
    source: str                      # "builtin" or the plugin's distribution
    available: bool
    reason: str = ""
    priority: int = 20
    factory: object = field(default=None, repr=False)


def _load(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


def discover() -> dict[str, BackendInfo]:
    """Every backend flashport knows of, with whether it can be used here and why not."""
    found: dict[str, BackendInfo] = {}
    for name, (target, probe) in BUILTINS.items():
        ok, why, prio = probe()
        found[name] = BackendInfo(name, "builtin", ok, why, prio, target)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        src = ep.dist.name if ep.dist else ep.value
        try:
            factory = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break flashport
            reason = f"failed to import: {e.__class__.__name__}: {e}"
            warnings.warn(f"flashport backend plugin {ep.name!r} ({src}) {reason}", RuntimeWarning, stacklevel=2)
            found[ep.name] = BackendInfo(ep.name, src, False, reason)
            continue
        version = getattr(factory, "api_version", API_VERSION)
        if tuple(version)[0] != API_VERSION[0]:
            reason = f"built for backend API {tuple(version)}, flashport speaks {API_VERSION}"
            warnings.warn(f"flashport backend plugin {ep.name!r} ({src}): {reason}", RuntimeWarning, stacklevel=2)
            found[ep.name] = BackendInfo(ep.name, src, False, reason)
            continue
        found[ep.name] = BackendInfo(ep.name, src, True, "", getattr(factory, "priority", 20), factory)
    return found


def create(name: str = "auto", **options) -> Backend:
    """Instantiate a backend by name; "auto" picks the highest-priority one that initialises."""
    found = discover()
    if name != "auto":
        info = found.get(name)
        if info is None:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(found))}")
        if not info.available:
            raise BackendError(f"backend {name!r} is not available: {info.reason}")
        return _instantiate(info, options)
    for info in sorted(found.values(), key=lambda i: -i.priority):
        if not info.available:
            continue
        try:
            return _instantiate(info, options)
        except BackendError as e:
            warnings.warn(str(e), RuntimeWarning, stacklevel=2)
    raise BackendError("no backend could be initialised")  # unreachable while torch works


def _instantiate(info: BackendInfo, options: dict) -> Backend:
    factory = _load(info.factory) if isinstance(info.factory, str) else info.factory
    try:
        backend = factory(**options)
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"backend {info.name!r} ({info.source}) failed to initialise: "
                           f"{e.__class__.__name__}: {e}") from e
    return backend
