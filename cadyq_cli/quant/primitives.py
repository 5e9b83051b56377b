"""Pure quantization primitives (no modules, no state).

Formulas follow the CADyQ/PAMS definitions (spec §4):

* weights: symmetric per-tensor max-abs, ``W_q = round(W * qmax / m) * m / qmax`` with
  ``m = max|W| + 1e-8`` and ``qmax = 2**(bits-1) - 1``;
* activations: ``Q_b(x; a) = round(clip(x, -a, a) / a * qmax_b) / qmax_b * a``, a signed
  symmetric grid even for non-negative inputs (the official ``x.min() >= 0`` branch does the
  same thing as the other one).

Unsigned grid (``signed=False``, for quantizers whose input is a ReLU output): ``qmax = 2**bits - 1``
and the clip is ``[0, a]``, so a b-bit code has all ``2**b`` levels on the non-negative half (the
signed grid leaves half of them unused there). For non-negative x it is the same formula with the
larger ``qmax``.

``round`` is round-half-to-even (``torch.round``). In training mode the rounding is a
straight-through estimator so gradients reach both ``x`` and ``a``.
"""
from __future__ import annotations

import torch

__all__ = ["qmax_for_bits", "round_ste", "weight_scale", "fake_quant_weight", "fake_quant_act", "act_codes"]


def qmax_for_bits(bits: int, signed: bool = True) -> int:
    """Largest code of a ``bits``-bit grid: signed symmetric 7, 31, 127 (4, 6, 8 bits), unsigned 15, 63, 255."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    if not x.requires_grad:
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def weight_scale(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, int]:
    """``(m, qmax)`` of the symmetric per-tensor weight grid: ``m = max|W| + 1e-8``, step ``m / qmax``."""
    return w.detach().abs().max() + 1e-8, qmax_for_bits(bits)


def fake_quant_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-tensor max-abs fake quantization of a weight tensor.

    Args:
        w: weight tensor of any shape, float32.
        bits: weight bit-width (8 in every CADyQ model).

    Returns:
        Tensor of the same shape on the grid ``k * m / qmax``, ``|k| <= qmax``.
    """
    m, qmax = weight_scale(w, bits)
    return round_ste(w * qmax / m) * m / qmax


def fake_quant_act(x: torch.Tensor, alpha: torch.Tensor, qmax: torch.Tensor | float, inplace: bool = False,
                   signed: bool = True) -> torch.Tensor:
    """PAMS activation fake quantizer ``Q(x; alpha)`` with ``qmax`` levels on each side.

    ``alpha`` and ``qmax`` broadcast against ``x``: a scalar/``[1]`` tensor for a fixed
    quantizer, ``[N, 1, 1, 1]`` for one bit-width per sample, or ``[N, 1, H, W]`` for a
    spatial step map (one bit-width per region). The operation order is the official one,
    which reproduces its outputs bit for bit.

    Args:
        x: activations (N, C, H, W) float32.
        alpha: learned clip value(s), positive.
        qmax: ``2**(bits-1) - 1`` per element of the broadcast shape.
        inplace: at inference, overwrite x (the caller must not need it any more).
        signed: False for the unsigned grid: clip to ``[0, alpha]`` (``qmax`` is then ``2**bits - 1``).
    """
    if not (x.requires_grad or torch.is_tensor(alpha) and alpha.requires_grad and torch.is_grad_enabled()):
        # inference: the same operations in the same order, in place on one buffer
        # (bit-identical, about 3x faster than allocating a tensor per step)
        # clip(x, -a, a) / a == clip(x / a, -1, 1) bit for bit (|x| <= a: the same division;
        # beyond: exactly +-1 either way), and a scalar clamp is ~4x cheaper than tensor bounds
        return act_codes(x, alpha, qmax, inplace, signed).div_(qmax).mul_(alpha)
    c = torch.minimum(x, alpha)
    c = torch.maximum(c, -alpha) if signed else c.clamp_min(0.0)
    y = c / alpha
    y = round_ste(y * qmax) / qmax
    return y * alpha


def act_codes(x: torch.Tensor, alpha: torch.Tensor | float, qmax: torch.Tensor | float, inplace: bool = False,
              signed: bool = True) -> torch.Tensor:
    """Integer codes ``round(clip(x / alpha, -1, 1) * qmax)`` of the activation quantizer, as float
    (``clip(x / alpha, 0, 1)`` on the unsigned grid).

    The first four operations of :func:`fake_quant_act` (inference path), in the same order;
    ``codes / qmax * alpha`` finishes it bit for bit.
    """
    y = x.div_(alpha) if inplace else torch.div(x, alpha)
    return y.clamp_(-1.0 if signed else 0.0, 1.0).mul_(qmax).round_()
