"""flashport: run DeepSeek-V4-Flash-class MoE models on edge boxes and non-NVIDIA accelerators."""

__version__ = "0.1.0"
