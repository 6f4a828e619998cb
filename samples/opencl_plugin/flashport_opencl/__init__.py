"""flashport-opencl: an example out-of-tree flashport backend on OpenCL (see docs/plugin-authoring.md)."""

from .backend import OpenCLBackend

__all__ = ["OpenCLBackend"]
