"""flashport.backends: the versioned backend contract, the registry, per-op dispatch with fallback."""

from .contract import API_VERSION, OPS, Backend, BackendError, Capabilities, DeviceInfo, QuantWeight
from .dispatch import Ops
from .registry import create, discover

__all__ = ["API_VERSION", "OPS", "Backend", "BackendError", "Capabilities", "DeviceInfo", "QuantWeight", "Ops",
           "create", "discover"]
