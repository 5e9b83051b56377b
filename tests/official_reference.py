"""Independent functional re-implementation of the official CADyQ inference.

Written only from ``/work/shared/spec/CHECKPOINT_FORMAT.md`` (section numbers below refer
to it). It does not import ``cadyq_cli``: it is the *reference* that the library is tested
against, so it must stay independent of it.

Public API
----------
* :func:`official_keys` -- key -> shape table of an official state_dict (spec section 3).
* :func:`unique_param_count` -- number of unique parameters (aliases once, buffers excluded).
* :func:`alias_groups` -- the groups of keys that name one tensor (spec section 2.2).
* :func:`random_official_state_dict` -- random, well-behaved official-format weights.
* :func:`calibrate_alphas` -- set clip values from an FP run (max |activation|).
* :func:`official_forward` -- (sr on 0..255, unclamped; bits per selector).
* :func:`official_patch_test` / :func:`official_whole_test` -- the test protocol (section 8).
* :func:`rename_pams_to_cadyq` / :func:`pams_to_cadyq_student` -- section 2.3.

All functions work on plain ``dict[str, torch.Tensor]`` state dicts, CPU, float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

ARCHS = ("edsr", "carn", "srresnet", "idn")
KINDS = ("cadyq", "pams")
RGB_MEAN = (0.4488, 0.4371, 0.4040)
SEARCH_SPACE = (4, 6, 8)
N_SELECTORS = {"edsr": 32, "carn": 18, "idn": 24, "srresnet": 32}
IDN_LRELU = 0.05
BUFFER_LEAVES = ("max_val", "running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------
# Section 3: key tables
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple[int, ...]
    alias_of: str | None = None  # key of the tensor this one shares storage with


class _Table:
    """Ordered builder of state_dict entries."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def add(self, key: str, shape: Iterable[int], alias_of: str | None = None) -> None:
        self.entries.append(_Entry(key, tuple(shape), alias_of))

    def conv(self, name: str, cout: int, cin: int, k: int, bias: bool = True) -> None:
        self.add(f"{name}.weight", (cout, cin, k, k))
        if bias:
            self.add(f"{name}.bias", (cout,))

    def pams(self, name: str, alias_of: str | None = None) -> None:
        self.add(f"{name}.alpha", (1,), None if alias_of is None else f"{alias_of}.alpha")
        self.add(f"{name}.max_val", (), None if alias_of is None else f"{alias_of}.max_val")

    def selector(self, name: str, channels: int) -> None:
        for j in (1, 2, 3):
            self.pams(f"{name}.quant_bit{j}")
        self.add(f"{name}.net_small.0.weight", (3, channels + 2))
        self.add(f"{name}.net_small.0.bias", (3,))

    def bn(self, name: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            self.add(f"{name}.{leaf}", (c,))
        self.add(f"{name}.num_batches_tracked", ())

    def meanshift(self, name: str) -> None:
        self.conv(name, 3, 3, 1)


def _check_args(arch: str, scale: int, kind: str | None = None) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    if scale not in (2, 3, 4):
        raise ValueError(f"unsupported scale {scale}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")


def _edsr_entries(t: _Table, scale: int, cadyq: bool) -> None:
    t.meanshift("sub_mean")
    t.meanshift("add_mean")
    t.conv("head.0", 64, 3, 3)
    for i in range(16):
        b = f"body.{i}"
        if cadyq:
            t.selector(f"{b}.bitsel1", 64)
            t.conv(f"{b}.body.0", 64, 64, 3)
            t.selector(f"{b}.body.2", 64)
            t.conv(f"{b}.body.3", 64, 64, 3)
            t.pams(f"{b}.quant_act3")
        else:
            t.pams(f"{b}.quant_act1")
            t.pams(f"{b}.quant_act2")
            t.pams(f"{b}.quant_act3")
            t.conv(f"{b}.body.0", 64, 64, 3)
            t.pams(f"{b}.body.2", alias_of=f"{b}.quant_act2")
            t.conv(f"{b}.body.3", 64, 64, 3)
    t.conv("body.16", 64, 64, 3)
    if scale == 3:
        t.conv("tail.0.0", 576, 64, 3)
    else:
        t.conv("tail.0.0", 256, 64, 3)
        if scale == 4:
            t.conv("tail.0.2", 256, 64, 3)
    t.conv("tail.1", 3, 64, 3)


def _carn_entries(t: _Table, cadyq: bool) -> None:
    t.meanshift("sub_mean.shifter")
    t.meanshift("add_mean.shifter")
    t.conv("entry", 64, 3, 3)
    for bb in (1, 2, 3):
        for rr in (1, 2, 3):
            u = f"b{bb}.b{rr}"
            if cadyq:
                t.selector(f"{u}.body.0", 64)
                t.conv(f"{u}.body.1", 64, 64, 3)
                t.selector(f"{u}.body.3", 64)
                t.conv(f"{u}.body.4", 64, 64, 3)
            else:
                t.pams(f"{u}.quant_act1")
                t.pams(f"{u}.quant_act2")
                t.pams(f"{u}.body.0", alias_of=f"{u}.quant_act1")
                t.conv(f"{u}.body.1", 64, 64, 3)
                t.pams(f"{u}.body.3", alias_of=f"{u}.quant_act2")
                t.conv(f"{u}.body.4", 64, 64, 3)
        for k in (1, 2, 3):
            t.conv(f"b{bb}.c{k}.body.0", 64, 64 * (k + 1), 1)
    for k in (1, 2, 3):
        t.conv(f"c{k}.body.0", 64, 64 * (k + 1), 1)
    t.conv("upsample.up2.body.0", 256, 64, 3)
    t.conv("upsample.up3.body.0", 576, 64, 3)
    t.conv("upsample.up4.body.0", 256, 64, 3)
    t.conv("upsample.up4.body.3", 256, 64, 3)
    t.conv("exit", 3, 64, 3)


# (conv index, in channels, out channels, groups) of the three QConvs of each IDN branch
_IDN_TOP = ((1, 64, 48, 1), (4, 48, 32, 4), (7, 32, 64, 1))
_IDN_BOTTOM = ((1, 48, 64, 1), (4, 64, 48, 4), (7, 48, 80, 1))


def _idn_entries(t: _Table, cadyq: bool) -> None:
    t.pams("fblock.quant_actf1")
    t.pams("fblock.quant_actf2")
    t.pams("fblock.module.0", alias_of="fblock.quant_actf1")
    t.conv("fblock.module.1", 64, 3, 3)
    t.pams("fblock.module.3", alias_of="fblock.quant_actf2")
    t.conv("fblock.module.4", 64, 64, 3)
    for d in range(4):
        p = f"dblocks.{d}"
        if not cadyq:
            for n in range(1, 7):
                t.pams(f"{p}.quant_act{n}")
        for bi, (branch, spec) in enumerate((("top", _IDN_TOP), ("bottom", _IDN_BOTTOM))):
            for si, (idx, cin, cout, groups) in enumerate(spec):
                name = f"{p}.enhancement_{branch}"
                if cadyq:
                    t.selector(f"{name}.{idx - 1}", cin)
                else:
                    t.pams(f"{name}.{idx - 1}", alias_of=f"{p}.quant_act{3 * bi + si + 1}")
                t.conv(f"{name}.{idx}", cout, cin // groups, 3)
        t.conv(f"{p}.compression", 64, 80, 1)
    t.add("deconv.weight", (64, 3, 17, 17))
    t.add("deconv.bias", (3,))


def _srresnet_entries(t: _Table, scale: int, cadyq: bool) -> None:
    t.meanshift("sub_mean")
    t.meanshift("add_mean")
    t.conv("head.0", 64, 3, 9, bias=False)
    t.add("head.1.weight", (1,))
    for i in range(16):
        b = f"body.{i}"
        if cadyq:
            t.selector(f"{b}.classify1", 64)
            t.selector(f"{b}.classify2", 64)
        else:
            t.pams(f"{b}.quant_act1")
            t.pams(f"{b}.quant_act2")
        t.conv(f"{b}.conv1", 64, 64, 3)
        t.conv(f"{b}.conv2", 64, 64, 3)
        t.bn(f"{b}.bn1", 64)
        t.add(f"{b}.act.weight", (1,), alias_of="head.1.weight")
        t.bn(f"{b}.bn2", 64)
    t.conv("body.16", 64, 64, 3, bias=False)
    t.bn("body.17", 64)
    if scale in (2, 4):  # x3 is broken upstream: empty upsampler, no keys (section 9.9)
        t.conv("tail.0.0", 256, 64, 3, bias=False)
        t.add("tail.0.2.weight", (1,))
        if scale == 4:
            t.conv("tail.0.3", 256, 64, 3, bias=False)
            t.add("tail.0.5.weight", (1,))
    t.conv("tail.1", 3, 64, 9, bias=False)


def _entries(arch: str, scale: int, kind: str) -> list[_Entry]:
    _check_args(arch, scale, kind)
    t = _Table()
    cadyq = kind == "cadyq"
    if arch == "edsr":
        _edsr_entries(t, scale, cadyq)
    elif arch == "carn":
        _carn_entries(t, cadyq)
    elif arch == "idn":
        _idn_entries(t, cadyq)
    else:
        _srresnet_entries(t, scale, cadyq)
    return t.entries


def official_keys(arch: str, scale: int, kind: str) -> dict[str, tuple[int, ...]]:
    """Full key -> shape table of the official state_dict, alias keys included (section 3).

    SRResNet x3 is the (broken upstream) key set of section 9 item 9; it cannot be run.
    """
    return {e.key: e.shape for e in _entries(arch, scale, kind)}


def alias_groups(arch: str, scale: int, kind: str) -> list[list[str]]:
    """Groups (size >= 2) of keys naming one tensor; the first key is the primary one."""
    groups: dict[str, list[str]] = {}
    for e in _entries(arch, scale, kind):
        if e.alias_of is not None:
            groups.setdefault(e.alias_of, [e.alias_of]).append(e.key)
    return list(groups.values())


def is_buffer_key(key: str) -> bool:
    """True for buffers (not parameters): max_val and BatchNorm running statistics."""
    return key.rsplit(".", 1)[-1] in BUFFER_LEAVES


def unique_param_count(arch: str, scale: int, kind: str) -> int:
    """Unique parameters as in the spec's counts table: aliases once, buffers excluded."""
    return sum(
        math.prod(e.shape)
        for e in _entries(arch, scale, kind)
        if e.alias_of is None and not is_buffer_key(e.key)
    )


# ---------------------------------------------------------------------------------------
# Random state dicts
# ---------------------------------------------------------------------------------------


def _conv_gain(arch: str, key: str) -> float:
    """Gain of a conv weight (std = gain / sqrt(fan_in)) keeping activations O(1..100)."""
    name = key[: -len(".weight")]
    if arch == "edsr":
        if name == "head.0":
            return 0.05  # input is about +-128 after the mean shift
        if name.endswith("body.0"):
            return 1.4
        if name.endswith("body.3"):
            return 0.3
        if name == "tail.1":
            return 8.0
        return 1.0
    if arch == "carn":
        if name == "entry":
            return 1.4
        if name.endswith("body.1"):
            return 1.4
        if name.endswith("body.4"):
            return 0.3
        if name == "exit":
            return 0.5
        return 1.0
    if arch == "idn":
        if name == "fblock.module.1":
            return 0.05  # raw 0..255 image
        if name == "deconv":
            return 3.0
        if name.endswith("compression"):
            return 0.7
        return 1.4
    # srresnet
    if name == "head.0":
        return 0.03
    if name.endswith("conv1"):
        return 1.4
    if name.endswith("conv2"):
        return 0.3
    if name == "tail.1":
        return 3.0
    return 1.0


def random_official_state_dict(
    arch: str, scale: int, kind: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random official-format state_dict; alias keys share one tensor object.

    Conv weights are Gaussian with std gain/sqrt(fan_in); QConv/conv biases are small;
    MeanShift layers are identity with the section 1.1 bias; BatchNorm stats are plausible;
    selector Linear layers are scaled so that logits differ by O(1) and the chosen bits
    vary with the content.  Clip values are rough; use :func:`calibrate_alphas` to set them.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float32)

    grad_scale = 1.0 if arch == "carn" else 1000.0
    mean = torch.tensor(RGB_MEAN, dtype=torch.float32)
    ms_scale = 1.0 if arch == "carn" else 255.0
    prelu_slope = torch.tensor([0.1 + 0.2 * float(rand(1))])
    sd: dict[str, torch.Tensor] = {}
    for e in _entries(arch, scale, kind):
        key, shape = e.key, e.shape
        if e.alias_of is not None:
            sd[key] = sd[e.alias_of]
            continue
        leaf = key.rsplit(".", 1)[-1]
        if key in ("sub_mean.weight", "add_mean.weight", "sub_mean.shifter.weight",
                   "add_mean.shifter.weight"):
            val = torch.eye(3, dtype=torch.float32).view(3, 3, 1, 1)
        elif key.startswith("sub_mean") and leaf == "bias":
            val = -ms_scale * mean / torch.ones(3)
        elif key.startswith("add_mean") and leaf == "bias":
            val = ms_scale * mean / torch.ones(3)
        elif leaf == "alpha":
            val = torch.tensor([255.0 if "quant_actf1" in key else 4.0 + 4.0 * float(rand(1))])
        elif leaf == "max_val":
            val = torch.tensor(5.0)
        elif key.endswith("net_small.0.weight"):
            c = shape[1] - 2
            val = torch.empty(shape)
            # gradient features are O(0..100) (x1000) or O(0..0.1) (CARN)
            val[:, :2] = randn(3, 2) * (0.04 * 1000.0 / grad_scale)
            val[:, 2:] = randn(3, c) * (0.5 / math.sqrt(c))
        elif key.endswith("net_small.0.bias"):
            val = randn(3) * 1.0
        elif leaf == "num_batches_tracked":
            val = torch.tensor(1000, dtype=torch.int64)
        elif leaf == "running_mean":
            val = randn(*shape) * 0.1
        elif leaf == "running_var":
            val = 0.5 + rand(*shape)
        elif re.search(r"\.bn\d\.(weight|bias)$|^body\.17\.(weight|bias)$", key):
            val = 0.5 + rand(*shape) if leaf == "weight" else randn(*shape) * 0.1
        elif len(shape) == 1 and shape[0] == 1 and leaf == "weight":  # PReLU
            val = prelu_slope.clone() if key == "head.1.weight" else torch.tensor(
                [0.1 + 0.2 * float(rand(1))]
            )
        elif leaf == "weight":
            if key == "deconv.weight":
                fan_in = shape[0] * shape[2] * shape[3] / (scale * scale)
            else:
                fan_in = shape[1] * shape[2] * shape[3]
            val = randn(*shape) * (_conv_gain(arch, key) / math.sqrt(fan_in))
            if arch == "srresnet" and key == "tail.1.weight":
                val = val + 0.007  # no bias, no mean shift: lift the output towards 0..255
        elif leaf == "bias":
            val = randn(*shape) * 0.02
        else:  # pragma: no cover - every key is handled above
            raise AssertionError(key)
        assert tuple(val.shape) == shape, (key, val.shape, shape)
        sd[key] = val.contiguous()
    return sd


def relink_aliases(sd: dict[str, torch.Tensor], arch: str, scale: int, kind: str) -> None:
    """Make every alias key point at its primary key's tensor (in place)."""
    for group in alias_groups(arch, scale, kind):
        for k in group[1:]:
            sd[k] = sd[group[0]]


# ---------------------------------------------------------------------------------------
# Section 4: quantizers; section 5: selector
# ---------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-tensor symmetric max-abs weight fake-quant, official op order (section 4.1)."""
    qmax = 2 ** (bits - 1) - 1
    m = w.abs().max() + 1e-8
    return torch.round((w * qmax) / m) * m / qmax


def pams_quant(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PAMS activation fake-quant in eval mode (section 4.2); signed grid in both branches."""
    qmax = 2 ** (bits - 1) - 1
    c = torch.max(torch.min(x, alpha), -alpha)
    y = c / alpha
    y = torch.round(y * qmax) / qmax
    return y * alpha


def gradient_feature(x01: torch.Tensor) -> torch.Tensor:
    """kornia-equivalent image-gradient feature (section 5.1 steps 2-5), before any x1000."""
    r, g, b = x01[:, 0:1], x01[:, 1:2], x01[:, 2:3]
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    kernel = torch.stack([kx, kx.t()]).unsqueeze(1).to(x01.dtype)  # [2,1,3,3], x then y
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernel)
    return grad.abs().mean(dim=(2, 3))  # [B, 2]


class _Runner:
    """Holds a state dict and executes one forward pass in 'quant' or 'calib' mode."""

    def __init__(
        self,
        sd: dict[str, torch.Tensor],
        cadyq: bool,
        gfeat: torch.Tensor,
        calib: bool = False,
    ) -> None:
        self.sd = sd
        self.cadyq = cadyq
        self.g = gfeat
        self.calib = calib
        self.bits: list[torch.Tensor] = []
        self.stats: dict[str, float] = {}

    # -- plain layers ------------------------------------------------------------------
    def conv(self, x: torch.Tensor, name: str, padding: int = 1, groups: int = 1,
             quant: bool = False) -> torch.Tensor:
        w = self.sd[f"{name}.weight"]
        if quant and not self.calib:
            w = quantize_weight(w)
        return F.conv2d(x, w, self.sd.get(f"{name}.bias"), padding=padding, groups=groups)

    def qconv(self, x: torch.Tensor, name: str, padding: int = 1, groups: int = 1) -> torch.Tensor:
        return self.conv(x, name, padding, groups, quant=True)

    def bn(self, x: torch.Tensor, name: str) -> torch.Tensor:
        sd = self.sd
        return F.batch_norm(
            x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
            sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, 1e-5,
        )

    # -- quantizers --------------------------------------------------------------------
    def _record(self, prefix: str, x: torch.Tensor) -> None:
        v = float(x.detach().abs().max())
        self.stats[prefix] = max(self.stats.get(prefix, 0.0), v)

    def qact(self, x: torch.Tensor, prefix: str, bits: int = 8) -> torch.Tensor:
        """Fixed Q_bits quantizer whose alpha is ``{prefix}.alpha``."""
        if self.calib:
            self._record(prefix, x)
            return x
        return pams_quant(x, self.sd[f"{prefix}.alpha"], bits)

    def selector(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """CADyQ bit selector (section 5.2) with the official STE expression."""
        if self.calib:
            self._record(prefix, x)
            return x
        sd = self.sd
        sigma = torch.std(x, dim=(2, 3))
        z = torch.cat([self.g, sigma], dim=1)
        logits = F.linear(z, sd[f"{prefix}.net_small.0.weight"], sd[f"{prefix}.net_small.0.bias"])
        k = torch.argmax(logits, dim=1)  # first maximum wins
        cands = [
            pams_quant(x, sd[f"{prefix}.quant_bit{j + 1}.alpha"], b)
            for j, b in enumerate(SEARCH_SPACE)
        ]
        p = torch.softmax(logits, dim=1)
        n = x.shape[0]
        hard = torch.stack(cands, 0)[k, torch.arange(n)]
        soft = (
            p[:, 0].view(n, 1, 1, 1) * cands[0]
            + p[:, 1].view(n, 1, 1, 1) * cands[1]
            + p[:, 2].view(n, 1, 1, 1) * cands[2]
        )
        out = (hard - soft) + soft
        table = torch.tensor(SEARCH_SPACE, dtype=torch.float32)
        self.bits.append(table[k])
        return out

    def dyn(self, x: torch.Tensor, cadyq_prefix: str, pams_prefix: str) -> torch.Tensor:
        """Dynamic quantizer site: selector (CADyQ) or fixed Q_8 (PAMS)."""
        if self.cadyq:
            return self.selector(x, cadyq_prefix)
        return self.qact(x, pams_prefix, 8)


# ---------------------------------------------------------------------------------------
# Section 6: forward per backbone
# ---------------------------------------------------------------------------------------


def _pixel_upsampler(run: _Runner, x: torch.Tensor, convs: list[str], scale: int,
                     relu: bool) -> torch.Tensor:
    stages = [3] if scale == 3 else [2] * (1 if scale == 2 else 2)
    for name, r in zip(convs, stages):
        x = run.conv(x, name)
        if relu:
            x = F.relu(x)
        x = F.pixel_shuffle(x, r)
    return x


def _edsr(run: _Runner, x: torch.Tensor, scale: int) -> torch.Tensor:
    h = run.conv(run.conv(x, "sub_mean", padding=0), "head.0")
    r = h
    for i in range(16):
        b = f"body.{i}"
        s = run.dyn(r, f"{b}.bitsel1", f"{b}.quant_act1")
        t = F.relu(run.qconv(s, f"{b}.body.0"))
        t = run.dyn(t, f"{b}.body.2", f"{b}.quant_act2")
        t = run.qconv(t, f"{b}.body.3")
        t = run.qact(t * 1.0, f"{b}.quant_act3", 8)  # res_scale = 1
        r = t + s
    r = run.conv(r, "body.16") + h
    convs = ["tail.0.0"] if scale in (2, 3) else ["tail.0.0", "tail.0.2"]
    y = _pixel_upsampler(run, r, convs, scale, relu=False)
    return run.conv(run.conv(y, "tail.1"), "add_mean", padding=0)


def _carn(run: _Runner, x01: torch.Tensor, scale: int) -> torch.Tensor:
    def res_unit(u: torch.Tensor, p: str) -> torch.Tensor:
        t = run.dyn(u, f"{p}.body.0", f"{p}.quant_act1")
        t = F.relu(run.qconv(t, f"{p}.body.1"))
        t = run.dyn(t, f"{p}.body.3", f"{p}.quant_act2")
        t = run.qconv(t, f"{p}.body.4")
        return F.relu(t + u)

    def cascade(u: torch.Tensor, units: list[Callable[[torch.Tensor], torch.Tensor]],
                convs: list[str]) -> torch.Tensor:
        c = u
        o = u
        for unit, cname in zip(units, convs):
            b = unit(o)
            c = torch.cat([c, b], dim=1)
            o = F.relu(run.conv(c, cname, padding=0))
        return o

    def block(bb: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(u: torch.Tensor) -> torch.Tensor:
            units = [lambda v, rr=rr: res_unit(v, f"b{bb}.b{rr}") for rr in (1, 2, 3)]
            return cascade(u, units, [f"b{bb}.c{k}.body.0" for k in (1, 2, 3)])
        return f

    h = run.conv(run.conv(x01, "sub_mean.shifter", padding=0), "entry")
    o = cascade(h, [block(bb) for bb in (1, 2, 3)], [f"c{k}.body.0" for k in (1, 2, 3)])
    up = f"upsample.up{scale}"
    convs = [f"{up}.body.0"] if scale in (2, 3) else [f"{up}.body.0", f"{up}.body.3"]
    y = _pixel_upsampler(run, o, convs, scale, relu=True)
    return run.conv(run.conv(y, "exit"), "add_mean.shifter", padding=0)


def _idn(run: _Runner, x: torch.Tensor, scale: int) -> torch.Tensor:
    def lrelu(v: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(v, IDN_LRELU)

    n, _, hh, ww = x.shape
    bic = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    t = run.qact(x, "fblock.quant_actf1", 8)
    t = lrelu(run.qconv(t, "fblock.module.1"))
    t = run.qact(t, "fblock.quant_actf2", 8)
    t = lrelu(run.qconv(t, "fblock.module.4"))
    for d in range(4):
        p = f"dblocks.{d}"
        r = t
        u = r
        for si, (idx, _cin, _cout, groups) in enumerate(_IDN_TOP):
            name = f"{p}.enhancement_top"
            u = run.dyn(u, f"{name}.{idx - 1}", f"{p}.quant_act{si + 1}")
            u = lrelu(run.qconv(u, f"{name}.{idx}", groups=groups))
        s1, s2 = u[:, :48], u[:, 48:]
        v = s1
        for si, (idx, _cin, _cout, groups) in enumerate(_IDN_BOTTOM):
            name = f"{p}.enhancement_bottom"
            v = run.dyn(v, f"{name}.{idx - 1}", f"{p}.quant_act{si + 4}")
            v = lrelu(run.qconv(v, f"{name}.{idx}", groups=groups))
        t = run.conv(v + torch.cat([r, s2], dim=1), f"{p}.compression", padding=0)
    d_out = F.conv_transpose2d(
        t, run.sd["deconv.weight"], run.sd["deconv.bias"], stride=scale, padding=8,
        output_padding=scale - 1,
    )
    assert d_out.shape[-2:] == (hh * scale, ww * scale)
    return bic + d_out


def _srresnet(run: _Runner, x: torch.Tensor, scale: int) -> torch.Tensor:
    sd = run.sd
    h = F.prelu(run.conv(x, "head.0", padding=4), sd["head.1.weight"])
    r = h
    for i in range(16):
        b = f"body.{i}"
        slope = sd.get(f"{b}.act.weight", sd["head.1.weight"])
        s = run.dyn(r, f"{b}.classify1", f"{b}.quant_act1")
        t = F.prelu(run.bn(run.qconv(r, f"{b}.conv1"), f"{b}.bn1"), slope)
        t = run.dyn(t, f"{b}.classify2", f"{b}.quant_act2")
        t = run.bn(run.qconv(t, f"{b}.conv2"), f"{b}.bn2") * 1.0  # res_scale = 1
        r = t + s
    r = run.bn(run.conv(r, "body.16"), "body.17") + h
    y = F.prelu(F.pixel_shuffle(run.conv(r, "tail.0.0"), 2), sd["tail.0.2.weight"])
    if scale == 4:
        y = F.prelu(F.pixel_shuffle(run.conv(y, "tail.0.3"), 2), sd["tail.0.5.weight"])
    return run.conv(y, "tail.1", padding=4)


def is_cadyq_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """CADyQ (selectors present) vs PAMS (fixed 8-bit) state dict."""
    return any(k.endswith("net_small.0.weight") for k in sd)


def _run_one(sd: dict[str, torch.Tensor], arch: str, scale: int, x: torch.Tensor,
             calib: bool = False) -> tuple[torch.Tensor, _Runner]:
    """One official forward of a batch-1 (or batch-N) input x on 0..255."""
    cadyq = is_cadyq_state_dict(sd)
    if arch == "carn":
        xin = x / 255.0
        g = gradient_feature(xin)
    else:
        xin = x
        g = gradient_feature(x / 255.0) * 1000.0
    run = _Runner(sd, cadyq, g, calib=calib)
    if arch == "edsr":
        y = _edsr(run, xin, scale)
    elif arch == "carn":
        y = _carn(run, xin, scale) * 255.0
    elif arch == "idn":
        y = _idn(run, xin, scale)
    else:
        y = _srresnet(run, xin, scale)
    return y, run


@torch.no_grad()
def official_forward(
    sd: dict[str, torch.Tensor], arch: str, scale: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official inference on x (N,3,H,W) float 0..255 (each sample run alone at batch 1).

    Returns (sr, bits): sr (N,3,sH,sW) on the 0..255 scale, NOT clamped or rounded; bits
    (N, n_selectors) float32 in selector call order (n_selectors = 0 for PAMS models).
    """
    _check_args(arch, scale)
    if arch == "srresnet" and scale == 3:
        raise ValueError("SRResNet x3 is broken upstream (spec section 9, item 9)")
    x = x.to(torch.float32)
    srs, bits = [], []
    for i in range(x.shape[0]):
        y, run = _run_one(sd, arch, scale, x[i : i + 1])
        srs.append(y)
        bits.append(torch.stack(run.bits, dim=1) if run.bits else torch.zeros(1, 0))
    return torch.cat(srs, 0), torch.cat(bits, 0)


@torch.no_grad()
def calibrate_alphas(
    sd: dict[str, torch.Tensor],
    arch: str,
    scale: int,
    x: torch.Tensor,
    candidate_factors: tuple[float, float, float] = (0.7, 0.85, 1.0),
) -> dict[str, torch.Tensor]:
    """Set every clip value alpha to the max |activation| seen in a full-precision run.

    FP run: no weight or activation quantization.  Selector candidates quant_bit1..3 get
    max * candidate_factors (distinct values, so using the wrong candidate's alpha shows).
    IDN's quant_actf1 sees the raw 0..255 image.  Returns a new dict (aliases relinked);
    ``max_val`` is set to the same statistic.
    """
    x = x.to(torch.float32)
    stats: dict[str, float] = {}
    for i in range(x.shape[0]):
        _, run = _run_one(sd, arch, scale, x[i : i + 1], calib=True)
        for k, v in run.stats.items():
            stats[k] = max(stats.get(k, 0.0), v)
    out = dict(sd)
    for prefix, v in stats.items():
        v = max(v, 1e-3)
        if f"{prefix}.quant_bit1.alpha" in sd:
            for j, f in enumerate(candidate_factors, start=1):
                out[f"{prefix}.quant_bit{j}.alpha"] = torch.tensor([v * f], dtype=torch.float32)
                out[f"{prefix}.quant_bit{j}.max_val"] = torch.tensor(v * f, dtype=torch.float32)
        else:
            out[f"{prefix}.alpha"] = torch.tensor([v], dtype=torch.float32)
            out[f"{prefix}.max_val"] = torch.tensor(v, dtype=torch.float32)
    # re-point the alias keys at the updated primary tensors
    relink_aliases(out, arch, scale, "cadyq" if is_cadyq_state_dict(sd) else "pams")
    return out


# ---------------------------------------------------------------------------------------
# Section 8: test protocol
# ---------------------------------------------------------------------------------------


def _starts(n: int, patch: int, step: int) -> list[int]:
    return list(range(0, max(n - patch, 0) + 1, step))


def _window(i: int, count: int, origin: int, margin: int, step_hr: int, total_hr: int,
            patch_len: int) -> tuple[slice, slice]:
    """(patch slice, output slice) kept along one axis (section 8, 'Combine')."""
    if count == 1:
        return slice(0, patch_len), slice(0, total_hr)
    if i == 0:
        return slice(0, margin + step_hr), slice(0, margin + step_hr)
    if i == count - 1:
        return slice(margin, patch_len), slice(origin + margin, total_hr)
    return slice(margin, margin + step_hr), slice(origin + margin, origin + margin + step_hr)


def _to_uint8(sr: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.clamp(sr, 0.0, 255.0))


def official_patch_test(
    sd: dict[str, torch.Tensor],
    arch: str,
    scale: int,
    lr_uint8_hwc: np.ndarray,
    patch: int = 96,
    step: int = 90,
) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Patch-wise official test (section 8): returns (HR uint8 HWC, per-patch bits, row-major).

    Each bits tensor has shape (1, n_selectors).
    """
    lr = torch.from_numpy(np.ascontiguousarray(lr_uint8_hwc)).permute(2, 0, 1).float().contiguous()
    lr = lr.unsqueeze(0)
    h, w = lr.shape[-2:]
    rows, cols = _starts(h, patch, step), _starts(w, patch, step)
    margin = int(((patch - step) / 2) * scale)
    step_hr = step * scale
    canvas = torch.zeros(3, h * scale, w * scale, dtype=torch.float32)
    all_bits: list[torch.Tensor] = []
    for i, x0 in enumerate(rows):
        x1 = h if i == len(rows) - 1 else x0 + patch
        for j, y0 in enumerate(cols):
            y1 = w if j == len(cols) - 1 else y0 + patch
            sr, bits = official_forward(sd, arch, scale, lr[:, :, x0:x1, y0:y1])
            sr = _to_uint8(sr)[0]
            all_bits.append(bits)
            pr, orow = _window(i, len(rows), x0 * scale, margin, step_hr, h * scale,
                               sr.shape[1])
            pc, ocol = _window(j, len(cols), y0 * scale, margin, step_hr, w * scale,
                               sr.shape[2])
            canvas[:, orow, ocol] += sr[:, pr, pc]
    img = canvas.permute(1, 2, 0).numpy().astype(np.uint8)
    return img, all_bits


def official_whole_test(
    sd: dict[str, torch.Tensor], arch: str, scale: int, lr_uint8_hwc: np.ndarray
) -> tuple[np.ndarray, torch.Tensor]:
    """Image-wise official test: one forward, clamp to [0,255], round half to even."""
    lr = torch.from_numpy(np.ascontiguousarray(lr_uint8_hwc)).permute(2, 0, 1).float().contiguous()
    sr, bits = official_forward(sd, arch, scale, lr.unsqueeze(0))
    img = _to_uint8(sr)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    return img, bits


def fab(bits: torch.Tensor) -> torch.Tensor:
    """Per-forward average bit (section 7): mean over selectors, shape (N,)."""
    return bits.mean(dim=1)


# ---------------------------------------------------------------------------------------
# Section 2.3: PAMS -> CADyQ student initialization
# ---------------------------------------------------------------------------------------


def _pams_rename_rules(arch: str) -> list[tuple[re.Pattern[str], str]]:
    if arch == "edsr":
        return [
            (re.compile(r"^(body\.\d+)\.quant_act1$"), r"\1.bitsel1"),
            (re.compile(r"^(body\.\d+)\.quant_act2$"), r"\1.body.2"),
        ]
    if arch == "carn":
        return [(re.compile(r"^(b\d\.b\d\.body\.[03])$"), r"\1")]
    if arch == "idn":
        return [(re.compile(r"^(dblocks\.[0-3]\.enhancement_(?:top|bottom)\.[036])$"), r"\1")]
    if arch == "srresnet":
        return [
            (re.compile(r"^(body\.\d+)\.quant_act1$"), r"\1.classify1"),
            (re.compile(r"^(body\.\d+)\.quant_act2$"), r"\1.classify2"),
        ]
    raise ValueError(arch)


def rename_pams_to_cadyq(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """main.py's renaming (section 2.3): each mapped PAMS alpha/max_val is popped and copied
    to quant_bit1..3 of the selector that replaces it. Other keys (aliases included) stay.
    """
    rules = _pams_rename_rules(arch)
    out = dict(sd)
    for key in list(sd.keys()):
        module, _, leaf = key.rpartition(".")
        if leaf not in ("alpha", "max_val"):
            continue
        for pat, repl in rules:
            if pat.match(module):
                target = pat.sub(repl, module)
                val = out.pop(key)
                for j in (1, 2, 3):
                    out[f"{target}.quant_bit{j}.{leaf}"] = val.clone()
                break
    return out


def pams_to_cadyq_student(
    sd: dict[str, torch.Tensor], arch: str, scale: int
) -> dict[str, torch.Tensor]:
    """Full CADyQ state dict as main.py's non-strict load leaves it: renamed keys, unexpected
    keys dropped, missing selector Linear layers at their constructor init (ones, (0,0,1)).
    """
    renamed = rename_pams_to_cadyq(sd, arch)
    out: dict[str, torch.Tensor] = {}
    for key, shape in official_keys(arch, scale, "cadyq").items():
        if key in renamed:
            out[key] = renamed[key]
        elif key.endswith("net_small.0.weight"):
            out[key] = torch.ones(shape)
        elif key.endswith("net_small.0.bias"):
            out[key] = torch.tensor([0.0, 0.0, 1.0])
        else:
            raise KeyError(f"missing after renaming: {key}")
    relink_aliases(out, arch, scale, "cadyq")
    return out
