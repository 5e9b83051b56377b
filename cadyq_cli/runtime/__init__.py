"""Torch-free inference: the shipped EDSR-baseline CADyQ models as OpenVINO graphs (``--kernels openvino``).

Nothing here imports PyTorch; ``openvino`` is an optional dependency (``pip install cadyq[openvino]``).
"""
from __future__ import annotations
