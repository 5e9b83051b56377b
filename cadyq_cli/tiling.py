"""Pure tiling geometry: which LR box each network call sees and where its output goes.

Two plans:

* **seamless**: tiles whose *core* is aligned to the region grid, each fed to the network with
  ``context`` extra LR pixels on every side (clipped at the image border). Only the core of
  each output is kept, so with context >= the network's receptive radius the stitched result
  equals whole-image inference (in fp32).
* **paper**: the official patch protocol (spec §8): patches of ``patch`` LR px at a step of
  ``patch - overlap``, last row/column extended to the border, each patch keeping its centre
  window (margin ``int(overlap / 2 * scale)`` HR px), no blending.

No torch here: boxes are plain integers, (y0, y1, x0, x1) half-open.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tile", "plan_seamless", "plan_paper", "region_bounds", "starts"]


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


def plan_seamless(h: int, w: int, scale: int, tile: int, context: int, region: int) -> list[Tile]:
    """Tiles of ``tile`` LR px (rounded down to a multiple of ``region``), with context.

    An image no larger than ``tile + 2 * context`` on both sides is one tile without context.
    """
    if h <= tile + 2 * context and w <= tile + 2 * context:
        return [Tile((0, h, 0, w), (0, h * scale, 0, w * scale), 0, 0, (0, h, 0, w))]
    core = max(region, (tile // region) * region)
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


def plan_paper(h: int, w: int, scale: int, patch: int = 96, overlap: int = 6) -> list[Tile]:
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
