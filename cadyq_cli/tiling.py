"""Pure tiling geometry: which LR box each network call sees and where its output goes.

Two plans:

* **seamless**: tiles whose *core* is aligned to the region grid, each fed to the network with
  ``context`` extra LR pixels on every side (clipped at the image border). Only the core of
  each output is kept, so with context >= the network's receptive radius the stitched result
  equals whole-image inference (in fp32).
* **paper**: the official patch protocol (spec §8): patches of ``patch`` LR px at a step of
  ``patch - overlap``, last row/column extended to the border, each patch keeping its centre
  window (margin ``int(overlap / 2 * scale)`` HR px), no blending.

:class:`TilingConfig` says how an image is cut; :func:`plan_tiles` turns it into tiles. No torch
here: boxes are plain integers, (y0, y1, x0, x1) half-open.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Tile", "plan_seamless", "plan_paper", "region_bounds", "starts", "DEFAULT_SEAMLESS_TILE", "PAPER_PATCH", "PAPER_OVERLAP", "seamless_core",
    "check_seamless_tile", "TilingConfig", "TILINGS", "plan_tiles",
]

#: Seamless core tile size (LR px) when none is given: big enough that context is cheap,
#: small enough that x4 tail activations stay near 1 GB.
DEFAULT_SEAMLESS_TILE = 384

#: The paper's patch size (LR px): the official test patches and our default region for bits.
PAPER_PATCH = 96
#: Overlap of the official test patches (LR px): a step of 90.
PAPER_OVERLAP = 6


@dataclass(frozen=True)
class Tile:
    """One network call.

    Attributes:
        in_box: LR box fed to the network (y0, y1, x0, x1).
        out_box: HR box of the canvas this tile writes.
        src_y, src_x: offset of ``out_box`` inside the tile's HR output.
        core: LR box this tile is responsible for (its regions are reported from this tile).
    """

    in_box: tuple[int, int, int, int]
    out_box: tuple[int, int, int, int]
    src_y: int
    src_x: int
    core: tuple[int, int, int, int]

    @property
    def in_shape(self) -> tuple[int, int]:
        """(height, width) of the LR input."""
        return self.in_box[1] - self.in_box[0], self.in_box[3] - self.in_box[2]


def starts(length: int, patch: int, step: int) -> list[int]:
    """Official patch starts: 0, step, 2*step, ... up to and including max(length - patch, 0)."""
    last = max(length - patch, 0)
    return list(range(0, last + 1, step))


def region_bounds(length: int, region: int) -> list[int]:
    """Edges of regions of ``region`` px from 0: [0, r, 2r, ..., length]."""
    return list(range(0, length, region)) + [length]


def seamless_core(tile: int | None, region: int) -> int:
    """Core size (LR px) of seamless tiles: ``tile`` rounded down to a multiple of ``region``.

    The plan of :func:`plan_seamless` depends on ``tile`` only through this number.
    """
    return max(region, ((tile or DEFAULT_SEAMLESS_TILE) // region) * region)


def check_seamless_tile(tile: int | None, region: int) -> None:
    """Refuse, for quantized modes, a tile size whose seamless plan differs from the default one.

    A region cut by the edge of a tile's input is seen in part: its per-region std (and so its
    dynamic bits) changes, and the change spreads one region per layer, so no context margin
    keeps the output equal across plans. Fixed bit widths depend on the plan too, less: a float
    rounding difference between tile shapes can flip a quantization code. Quantized outputs are
    therefore defined for the default plan only; fp32 and the paper tiling take any tile.

    Raises:
        ValueError: ``tile`` gives another core size than the default tile at this ``region``.
    """
    want = seamless_core(None, region)
    if tile is None or seamless_core(tile, region) == want:
        return
    raise ValueError(
        f"--tile {tile}: quantized outputs depend on where tiles cut the {region} px regions (their bits change), "
        f"so they would change with the tile size; use --tile {want}..{want + region - 1} (the default plan at "
        f"--region {region}), --tiling paper, or --mode fp32"
    )


def plan_seamless(h: int, w: int, scale: int, tile: int, context: int, region: int) -> list[Tile]:
    """Tiles of ``tile`` LR px (rounded down to a multiple of ``region``), with context.

    An image no larger than ``core + 2 * context`` on both sides is one tile without context.
    """
    core = seamless_core(tile, region)
    if h <= core + 2 * context and w <= core + 2 * context:
        return [Tile((0, h, 0, w), (0, h * scale, 0, w * scale), 0, 0, (0, h, 0, w))]
    tiles = []
    for y0 in range(0, h, core):
        y1 = min(y0 + core, h)
        for x0 in range(0, w, core):
            x1 = min(x0 + core, w)
            iy0, iy1 = max(0, y0 - context), min(h, y1 + context)
            ix0, ix1 = max(0, x0 - context), min(w, x1 + context)
            tiles.append(
                Tile(
                    (iy0, iy1, ix0, ix1),
                    (y0 * scale, y1 * scale, x0 * scale, x1 * scale),
                    (y0 - iy0) * scale,
                    (x0 - ix0) * scale,
                    (y0, y1, x0, x1),
                )
            )
    return tiles


def _keep(i: int, n: int, start_hr: int, end_hr: int, margin: int, step_hr: int, total_hr: int) -> tuple[int, int, int]:
    """(canvas start, canvas end, offset in patch) along one axis for patch i of n (spec §8)."""
    if n == 1:
        return 0, total_hr, 0
    if i == 0:
        return 0, margin + step_hr, 0
    if i == n - 1:
        return start_hr + margin, total_hr, margin
    return start_hr + margin, start_hr + margin + step_hr, margin


def plan_paper(h: int, w: int, scale: int, patch: int = PAPER_PATCH, overlap: int = PAPER_OVERLAP) -> list[Tile]:
    """The official patch-wise test geometry, patches in row-major order."""
    step = patch - overlap
    if step <= 0:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({patch})")
    rows, cols = starts(h, patch, step), starts(w, patch, step)
    margin = int(((patch - step) / 2) * scale)
    tiles = []
    for i, y in enumerate(rows):
        y1 = h if i == len(rows) - 1 else y + patch
        oy0, oy1, sy = _keep(i, len(rows), y * scale, y1 * scale, margin, step * scale, h * scale)
        for j, x in enumerate(cols):
            x1 = w if j == len(cols) - 1 else x + patch
            ox0, ox1, sx = _keep(j, len(cols), x * scale, x1 * scale, margin, step * scale, w * scale)
            core = (oy0 // scale, -(-oy1 // scale), ox0 // scale, -(-ox1 // scale))
            tiles.append(Tile((y, y1, x, x1), (oy0, oy1, ox0, ox1), sy, sx, core))
    return tiles


TILINGS = ("seamless", "paper", "whole")


@dataclass(frozen=True)
class TilingConfig:
    """How an image is cut into network calls.

    Attributes:
        tiling: ``seamless`` (default), ``paper`` (official 96/90 patches) or ``whole``.
        tile: seamless: core tile size in LR px (rounded down to a multiple of ``region``);
            paper: patch size (default 96).
        overlap: paper: overlap between patches in LR px (default 6, i.e. step 90).
        region: seamless: bits are chosen per ``region`` x ``region`` LR px.
        batch: tiles of equal shape run together in one forward, up to this many and up to
            ``batch_pixels`` LR input pixels (big tiles gain nothing from batching and would
            multiply the memory).
        any_tile: accept a seamless ``tile`` whose plan differs from the default one in a
            quantized mode (e.g. to save memory), although the bits and the output then depend on it
            (see :func:`~cadyq_cli.tiling.check_seamless_tile`).
    """

    tiling: str = "seamless"
    tile: int | None = None
    overlap: int = PAPER_OVERLAP
    region: int = PAPER_PATCH
    batch: int = 8
    batch_pixels: int = 1 << 17
    any_tile: bool = False

    def validate(self, quantized: bool = False) -> None:
        """Raise ValueError for an impossible setting (``quantized``: also a tile-dependent plan)."""
        if self.tiling not in TILINGS:
            raise ValueError(f"unknown tiling {self.tiling!r}; choose one of {', '.join(TILINGS)}")
        if self.tile is not None and self.tile < 1:
            raise ValueError("--tile must be at least 1")
        if self.region < 1:
            raise ValueError("--region must be at least 1")
        if self.overlap < 0 or (self.tiling == "paper" and self.overlap >= (self.tile or PAPER_PATCH)):
            raise ValueError("--overlap must be >= 0 and smaller than --tile")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if quantized and self.tiling == "seamless" and not self.any_tile:
            check_seamless_tile(self.tile, self.region)


def plan_tiles(h: int, w: int, scale: int, cfg: TilingConfig, receptive_radius: int) -> tuple[list[Tile], int | None]:
    """The tiles of an h x w image under ``cfg`` and the region size (None: one region per tile)."""
    if cfg.tiling == "paper":
        return plan_paper(h, w, scale, cfg.tile or PAPER_PATCH, cfg.overlap), None
    if cfg.tiling == "whole":
        return [Tile((0, h, 0, w), (0, h * scale, 0, w * scale), 0, 0, (0, h, 0, w))], None
    return plan_seamless(h, w, scale, cfg.tile or DEFAULT_SEAMLESS_TILE, receptive_radius, cfg.region), cfg.region
