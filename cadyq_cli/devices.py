"""``--device`` strings: parsed and checked before any model is loaded.

Accepted: ``cpu`` and ``cuda`` / ``cuda:N`` (any letter case). Anything else, or a CUDA device
this machine does not have, is a :class:`DeviceError` whose one-line message names the valid
spellings and what is available here.
"""
from __future__ import annotations

import os
import re

from .errors import CadyqError

__all__ = ["DeviceError", "available_devices", "parse_device", "cpu_has_bf16", "cpu_has_int8_dot"]

_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(CadyqError, ValueError):
    """A ``--device`` string names no device this machine has (a usage error)."""


def _cuda_count() -> int:
    import torch  # local: listing models must not import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def available_devices() -> list[str]:
    """Devices usable here: ``cpu``, then ``cuda:0`` .. ``cuda:N-1``."""
    return ["cpu", *(f"cuda:{i}" for i in range(_cuda_count()))]


def parse_device(text: str) -> str:
    """Normalize a device string (``CPU`` -> ``cpu``, ``cuda`` -> ``cuda:0``) and check it exists.

    Raises:
        DeviceError: unknown spelling, or a CUDA device that is not available here.
    """
    name = text.strip().lower()
    if name == "cpu":
        return "cpu"
    here = f"available here: {', '.join(available_devices())}"
    m = _CUDA.fullmatch(name)
    if m is None:
        raise DeviceError(f"--device {text}: unknown device; use cpu, cuda or cuda:N ({here})")
    index = int(m.group(1) or 0)
    if index >= _cuda_count():
        raise DeviceError(f"--device {text}: no such CUDA device ({here})")
    return f"cuda:{index}"


def _isa_cap() -> str:
    """oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``), upper case; "" without one."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return "" if cap in ("ALL", "DEFAULT") else cap


def _allowed_flags(cap: str, kind: str) -> tuple[str, ...]:
    """CPU flags whose instructions oneDNN may use for ``kind`` (``int8`` dot products or ``bf16``) under ISA
    cap ``cap`` (conservative: a cap that may exclude them allows none)."""
    avx512 = cap.startswith("AVX10") or cap in ("AVX512_CORE_BF16", "AVX512_CORE_FP16")
    if kind == "int8":
        if "AMX" in cap:
            return ("amx_int8", "avx512_vnni")
        if avx512 or cap == "AVX512_CORE_VNNI":
            return ("avx512_vnni",)
        return ("avx_vnni",) if cap.startswith("AVX2_VNNI") else ()
    if "AMX" in cap:
        return ("amx_bf16", "avx512_bf16")
    return ("avx512_bf16",) if avx512 else ()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and
    ``--fp-layers bf16`` is slower than fp32. Obeys oneDNN's ISA cap like :func:`cpu_has_int8_dot`."""
    cap = _isa_cap()
    flags = _cpu_flags()
    return any(f in flags for f in (_allowed_flags(cap, "bf16") if cap else ("avx512_bf16", "amx_bf16")))


def cpu_has_int8_dot() -> bool:
    """True when this CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX), which
    makes int8 convolutions exact (32-bit sums); without one, x86 int8 kernels may saturate 16-bit
    intermediate sums. ``CADYQ_INT8=0`` answers False (forces the float kernels), and so does oneDNN's
    ISA cap (``ONEDNN_MAX_CPU_ISA``, e.g. ``AVX2``) where it excludes those instructions: both PyTorch's
    and OpenVINO's int8 kernels obey it. No torch import."""
    if os.environ.get("CADYQ_INT8", "") == "0":
        return False
    cap = _isa_cap()
    flags = _cpu_flags()
    return any(f in flags for f in (_allowed_flags(cap, "int8") if cap else ("avx512_vnni", "avx_vnni", "amx_int8")))
