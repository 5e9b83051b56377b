"""Which engine runs a request, and loading its model: the OpenVINO runtime (:mod:`cadyq_cli.runtime`, no PyTorch)
for what it serves — a shipped EDSR-baseline or CARN model (or its .safetensors), dynamic or fp32, on the CPU —
else the PyTorch model (:func:`cadyq_cli.weights.load_model`). The commands of :mod:`cadyq_cli.cli` ask here;
nothing here prints or exits. Heavy packages are imported only by the function that needs them (start-up time).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CadyqError

__all__ = ["openvino_serves", "load_net", "openvino_eval_models", "model_label"]


def openvino_serves(model: str | None, weights: Path | None, arch: str | None, scale: int, mode: str, device: str,
                    bit_bias: float = 0.0, target_fab: float | None = None) -> bool:
    """Whether ``--kernels auto`` runs this request on the OpenVINO runtime: a shipped EDSR-baseline or CARN model in
    dynamic or fp32 mode on the CPU, with none of the options only the PyTorch engine has, and openvino
    installed; its quantized convs are exact int8 where the CPU has an int8 dot product, else the float
    reference's arithmetic. ``CADYQ_KERNELS=torch`` opts out."""
    if os.environ.get("CADYQ_KERNELS", "").lower() == "torch":
        return False
    if weights is not None or arch is not None or device.lower() != "cpu" or mode not in ("dynamic", "fp32"):
        return False
    if bit_bias or target_fab is not None:
        return False
    from .runtime.engine import ARCHS, openvino_available
    from .weights import DEFAULT_MODEL, resolve_weights

    try:
        cfg = resolve_weights(model or DEFAULT_MODEL, scale)
    except CadyqError:
        return False  # the PyTorch loader says what is wrong
    return cfg.arch in ARCHS and openvino_available()


def load_net(model: str | None, weights: Path | None, arch: str | None, scale: int, mode: str, device: str,
             threads: int, kernels: str = "auto", fp_layers: str = "fp32", bit_bias: float = 0.0,
             openvino: bool = False, target_fab: float | None = None) -> Any:
    """The model that runs a request: an :class:`~cadyq_cli.runtime.engine.OVModel` where ``kernels`` is
    ``openvino``, or ``auto`` and ``openvino`` (the command may run there) and :func:`openvino_serves`; else the
    PyTorch :class:`~cadyq_cli.models._base.SRModel` with ``kernels``, ``threads`` and the bit bias set.

    Raises:
        CadyqError: options that do not go together, or a model that cannot load (one line each).
    """
    if weights is not None and model is not None:
        raise CadyqError("give --model or --weights, not both")
    if kernels == "auto" and openvino and openvino_serves(model, weights, arch, scale, mode, device, bit_bias, target_fab):
        kernels = "openvino"
    if kernels == "openvino":
        if not openvino:
            raise CadyqError("--kernels openvino is for `cadyq upscale`, `cadyq bitmap` and `cadyq eval` only")
        if device.lower() != "cpu" or arch is not None or bit_bias or target_fab:
            raise CadyqError("--kernels openvino runs shipped EDSR-baseline and CARN models (or their .safetensors) on the CPU, "
                             "without --bit-bias or --target-fab")
        from .runtime.engine import load_openvino_model

        return load_openvino_model(model, weights, scale, mode, threads, fp_layers=fp_layers)
    import torch

    from .weights import load_model

    if threads:
        torch.set_num_threads(threads)
    if weights is None and arch is not None:
        raise CadyqError("--arch goes with --weights")
    if bit_bias and mode != "dynamic" and mode != "fp32":
        raise CadyqError(f"--bit-bias moves the dynamic mode's choices; --mode {mode} has fixed bits")
    net = load_model(model=model, weights=weights, arch=arch, scale=scale, mode=mode, device=device, kernels=kernels,
                     fp_layers=fp_layers)
    try:
        net.set_bit_bias(bit_bias)
    except ValueError as e:
        raise CadyqError(f"--bit-bias: {e}") from None
    return net


def openvino_eval_models(model: str | None, weights: Path | None, arch: str | None, scale: int, modes: list[str],
                         device: str, threads: int, fp_layers: str, bit_bias: float, curve: bool) -> dict[str, Any]:
    """``cadyq eval --kernels openvino``: the OpenVINO runtime's model of each mode (the runtime ``cadyq upscale``
    uses), all on one read of the weights.

    Raises:
        CadyqError: a mode, option or model the runtime does not run.
    """
    if any(m not in ("fp32", "dynamic") for m in modes) or curve:
        raise CadyqError("--kernels openvino evaluates --modes fp32 and dynamic (no --curve); "
                         "the PyTorch engine (--kernels auto) runs the others")
    from .runtime.engine import OVModel

    if not modes:
        return {}
    first, *rest = dict.fromkeys(modes)
    # load_net refuses, in its own words, what the runtime does not run (--arch, a device, --bit-bias)
    models = {first: load_net(model, weights, arch, scale, first, device, threads, "openvino", fp_layers, bit_bias,
                              openvino=True)}
    for m in rest:
        models[m] = OVModel(models[first].wts, m, threads, fp_layers=fp_layers)
    return models


def model_label(model: str | None, weights: Path | None, scale: int) -> str:
    """The name a report gives the model: the weights file, or the shipped model's name with its scale."""
    if weights is not None:
        return str(weights)
    return f"{model or 'edsr-baseline'}-x{scale}" if model is None or not model.endswith(f"-x{scale}") else model
