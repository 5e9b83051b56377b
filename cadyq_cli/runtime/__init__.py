"""Torch-free inference: the shipped EDSR-baseline and CARN CADyQ models as OpenVINO graphs (``--kernels openvino``).

Nothing here imports PyTorch; ``openvino`` is a dependency of cadyq (the default upscale runtime where it serves).
"""
from __future__ import annotations
